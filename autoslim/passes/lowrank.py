"""Low-rank factorisation (our own code: no maintained library does it for convs).

- Linear (in -> out): truncated SVD, ``Linear(in, r, bias=False)`` then ``Linear(r, out)``.
- Conv2d k x k (Cin -> Cout, groups=1): ``W`` reshaped to (Cout, Cin*k*k) and truncated by SVD;
  a k x k conv (Cin -> r) with the original stride/padding/dilation, then a 1 x 1 conv
  (r -> Cout) carrying the bias.
The factorised layer replaces the original as ``nn.Sequential`` at the same name (its parts are
``NAME.0`` and ``NAME.1``). The rank is ``rank_ratio * min(Cout, Cin*k*k)``, rounded up to a
multiple of ``round_to``; a rank that would not reduce parameters is refused with the reason.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import CompressionConfig
from . import PassReport

__all__ = ["factorize_model", "factorized_rank", "LOWRANK_SEP"]

LOWRANK_SEP = "."


def factorized_rank(full_rank: int, ratio: float, round_to: int) -> int:
    r = max(1, math.ceil(ratio * full_rank))
    if round_to > 1:
        r = math.ceil(r / round_to) * round_to
    return min(r, full_rank)


def _split(w2d: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w2d.double(), full_matrices=False)
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


@torch.no_grad()
def factorize_model(
    model: nn.Module, config: CompressionConfig, *, skip: tuple[str, ...] = ()
) -> PassReport:
    """Factorise, in place, every Conv2d/Linear whose config has a ``rank_ratio``."""
    report = PassReport("lowrank")
    for name, m in list(model.named_modules()):
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        ratio = config.layer(name).rank_ratio
        if ratio is None:
            continue
        if name in skip:
            report.skip(name, "layer excluded from factorisation (stem/classifier)")
            continue
        if isinstance(m, nn.Conv2d):
            if m.groups != 1:
                report.skip(name, f"grouped/depthwise conv (groups={m.groups}) has no SVD split")
                continue
            cout, cin, kh, kw = m.weight.shape
            full = min(cout, cin * kh * kw)
            r = factorized_rank(full, ratio, config.round_to)
            before, after = cout * cin * kh * kw, r * (cin * kh * kw + cout)
            if after >= before:
                report.skip(
                    name,
                    f"rank {r} would not reduce parameters ({after} >= {before})",
                    rank=r,
                    full_rank=full,
                )
                continue
            a, b = _split(m.weight.reshape(cout, -1), r)
            first = nn.Conv2d(
                cin,
                r,
                (kh, kw),
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                bias=False,
                padding_mode=m.padding_mode,
            )
            second = nn.Conv2d(r, cout, 1, bias=m.bias is not None)
            first.weight.copy_(b.reshape(r, cin, kh, kw))
            second.weight.copy_(a.reshape(cout, r, 1, 1))
        else:
            cout, cin = m.weight.shape
            full = min(cout, cin)
            r = factorized_rank(full, ratio, config.round_to)
            before, after = cout * cin, r * (cin + cout)
            if after >= before:
                report.skip(
                    name,
                    f"rank {r} would not reduce parameters ({after} >= {before})",
                    rank=r,
                    full_rank=full,
                )
                continue
            a, b = _split(m.weight, r)
            first, second = (
                nn.Linear(cin, r, bias=False),
                nn.Linear(r, cout, bias=m.bias is not None),
            )
            first.weight.copy_(b)
            second.weight.copy_(a)
        if m.bias is not None:
            second.bias.copy_(m.bias)
        seq = nn.Sequential(first, second).to(m.weight.device)
        seq.train(m.training)
        _set(model, name, seq)
        report.touch(name, rank=r, full_rank=full, params_before=before, params_after=after)
    return report
