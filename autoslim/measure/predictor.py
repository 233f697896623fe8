"""A latency predictor learned from a study's own measurements (numpy + scikit-learn; no torch).

Each measured trial gives one point: the features of its artifact
(:func:`autoslim.artifact.latency_features`: MACs, weight bytes, output elements by op kind
and bit width, Q/DQ boundaries, channel widths) and its latency as a ratio to the teacher timed
on the same device in the same process (ratios survive a resume and a drifting machine;
absolute times do not). Two model kinds, chosen by measurement (``BENCHMARKS.md``, ``make
bench-latency``):

- ``additive``: latency ratio = a non-negative sum of per-kind costs (per MAC of each op kind
  and bit width, per output element, per layer, per Q/DQ boundary): a per-op cost table fitted
  by non-negative least squares on relative error. It extrapolates to smaller and larger
  candidates than it has seen, which trees cannot.
- ``gbt``: scikit-learn gradient-boosted trees on log features, predicting the log ratio.

:meth:`LatencyPredictor.fit` also calibrates the model on held-out points (k-fold
cross-validated predictions): Spearman's rho and the share within +-10%. A predictor is used
for decisions only when rho >= :data:`MIN_RHO` on at least :data:`MIN_POINTS` points, and then
with a margin: the 90th percentile of its held-out relative error (at least 10%).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["LatencyPredictor", "Calibration", "spearman", "MIN_POINTS", "MIN_RHO", "KINDS"]

MIN_POINTS = 10  # measured trials before a predictor is calibrated at all
MIN_RHO = 0.9  # held-out Spearman below this: reported, never used for decisions
MIN_MARGIN = 0.10  # the least relative error a decision allows for
KINDS = ("additive", "gbt")

# the additive model's cost terms: features whose cost adds up per unit
_ADDITIVE = (
    "mmacs_dense_int8",
    "mmacs_dense_wq",
    "mmacs_dense_fp",
    "mmacs_dw_int8",
    "mmacs_dw_wq",
    "mmacs_dw_fp",
    "mmacs_fc_int8",
    "mmacs_fc_wq",
    "mmacs_fc_fp",
    "kact_int8",
    "kact_fp",
    "layers",
    "boundaries",
    "narrow",
    "unaligned",
)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 points."""
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    rho = spearmanr(a, b).statistic
    return float(rho) if np.isfinite(rho) else float("nan")


@dataclass(frozen=True)
class Calibration:
    """How well a predictor did on points it was not fitted on."""

    kind: str
    n: int  # measured points
    rho: float  # Spearman's rho of held-out predictions vs measurements
    within_10: float  # share of held-out predictions within +-10% of the measurement
    error_q90: float  # 90th percentile of the held-out relative error
    folds: int

    @property
    def usable(self) -> bool:
        """Good enough to pre-check a latency limit and to skip dominated measurements."""
        return self.n >= MIN_POINTS and np.isfinite(self.rho) and self.rho >= MIN_RHO

    @property
    def margin(self) -> float:
        """The relative error a decision allows for."""
        return max(MIN_MARGIN, self.error_q90)

    def to_dict(self) -> dict:
        return {**asdict(self), "usable": self.usable, "margin": self.margin}

    def line(self) -> str:
        """One line for the search log and the report."""
        use = (
            f"used (margin {self.margin:.0%})"
            if self.usable
            else (
                f"not used (needs rho >= {MIN_RHO} on >= {MIN_POINTS} measured trials)"
                if self.n >= 3
                else f"not used (needs >= {MIN_POINTS} measured trials)"
            )
        )
        rho = f"{self.rho:.3f}" if np.isfinite(self.rho) else "-"
        return (
            f"latency predictor ({self.kind}, {self.n} measured trials, {self.folds}-fold "
            f"held out): Spearman {rho}, {self.within_10:.0%} within +-10%; {use}"
        )


class LatencyPredictor:
    """Predicts an artifact's latency ratio to the teacher from its features."""

    def __init__(self, *, kind: str = "additive", seed: int = 0) -> None:
        if kind not in KINDS:
            raise ValueError(f"predictor kind {kind!r}; expected one of {KINDS}")
        self.kind, self.seed = kind, seed
        self.names: list[str] = []
        self.calibration: Calibration | None = None
        self._model = None

    def _matrix(self, features: Sequence[Mapping[str, float]]) -> np.ndarray:
        names = list(_ADDITIVE) if self.kind == "additive" else self.names
        return np.array([[float(f.get(k, 0.0)) for k in names] for f in features], dtype=float)

    def _new(self):
        if self.kind == "additive":
            return _Additive()
        from sklearn.ensemble import GradientBoostingRegressor

        return _LogTarget(
            GradientBoostingRegressor(
                n_estimators=200, max_depth=3, learning_rate=0.05, random_state=self.seed
            )
        )

    def fit(
        self, features: Sequence[Mapping[str, float]], ratios: Sequence[float]
    ) -> LatencyPredictor:
        """Fit on measured points and calibrate on held-out folds of them."""
        y = np.asarray(ratios, dtype=float)
        if len(features) != len(y) or len(y) < 2 or not np.all(y > 0):
            raise ValueError(f"need >= 2 points with positive ratios; got {len(y)}")
        self.names = sorted(features[0])
        x = self._matrix(features)
        self.calibration = self._calibrate(x, y)
        self._model = self._new().fit(x, y)
        return self

    def _calibrate(self, x: np.ndarray, y: np.ndarray) -> Calibration:
        n = len(y)
        folds = min(5, n)
        if n < 3:
            return Calibration(self.kind, n, float("nan"), 0.0, float("inf"), folds)
        order = np.random.default_rng(self.seed).permutation(n)
        pred = np.empty(n)
        for k in range(folds):
            test = order[k::folds]
            train = np.setdiff1d(order, test)
            pred[test] = self._new().fit(x[train], y[train]).predict(x[test])
        err = np.abs(pred / y - 1)
        return Calibration(
            kind=self.kind,
            n=n,
            rho=spearman(pred, y),
            within_10=float(np.mean(err <= 0.10)),
            error_q90=float(np.quantile(err, 0.9)),
            folds=folds,
        )

    def predict(self, features: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Predicted latency ratios to the teacher, one per feature dict."""
        if self._model is None:
            raise RuntimeError("fit the predictor first")
        return np.maximum(self._model.predict(self._matrix(features)), 1e-6)


class _Additive:
    """Non-negative least squares on relative error: min sum ((x.w + b) / y - 1)^2, w, b >= 0."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> _Additive:
        from scipy.optimize import nnls

        a = np.hstack([x, np.ones((len(x), 1))]) / y[:, None]  # rows scaled by 1/y
        self.scale = np.maximum(np.abs(a).max(0), 1e-12)  # column scaling for conditioning
        w, _ = nnls(a / self.scale, np.ones(len(y)))
        self.w = w / self.scale
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.hstack([x, np.ones((len(x), 1))]) @ self.w


class _LogTarget:
    """A regressor fitted on log features and log ratios (latencies span orders of magnitude)."""

    def __init__(self, model) -> None:
        self.model = model

    def fit(self, x: np.ndarray, y: np.ndarray) -> _LogTarget:
        self.model.fit(np.log1p(np.maximum(x, 0)), np.log(y))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.exp(self.model.predict(np.log1p(np.maximum(x, 0))))
