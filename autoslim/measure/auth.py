"""Shared-secret request signing between the search host and a device agent (stdlib only).

Both ends hold the same secret file (32 random bytes, hex, mode 0600). Every request carries
four headers: a timestamp, a random nonce, the SHA-256 of its body (hex, like AWS SigV4's
``x-amz-content-sha256``) and an HMAC-SHA256 over::

    METHOD\\nPATH\\nTIMESTAMP\\nNONCE\\nBODY_SHA256

(``PATH`` with its query string, if any). The signature covers the body's claimed digest, not
the body, so the agent authenticates a request from its headers alone
(:meth:`Verifier.verify_headers`), before it reads one byte of the body, and then checks that
the body it streams in hashes to the signed digest. The agent refuses a bad signature, a clock
skew over :data:`SKEW_S` either way and a nonce it has already seen, so a captured request
cannot be replayed. The secret is never sent, printed or put into a message.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import stat
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from ..errors import AutoslimError, UsageError

__all__ = [
    "DEFAULT_SECRET_FILE",
    "SKEW_S",
    "SECRET_BYTES",
    "TIMESTAMP_HEADER",
    "NONCE_HEADER",
    "CONTENT_SHA256_HEADER",
    "SIGNATURE_HEADER",
    "AuthError",
    "Verifier",
    "check_body",
    "create_secret",
    "load_secret",
    "sign",
]

DEFAULT_SECRET_FILE = Path("~/.config/autoslim/agent.secret")  # on the agent and the host
SKEW_S = 60  # the most seconds a request's timestamp may differ from the agent's clock
SECRET_BYTES = 32
TIMESTAMP_HEADER = "X-Autoslim-Timestamp"
NONCE_HEADER = "X-Autoslim-Nonce"
CONTENT_SHA256_HEADER = "X-Autoslim-Content-SHA256"  # the body's sha256 hex, signed
SIGNATURE_HEADER = "X-Autoslim-Signature"
_HEADERS = (TIMESTAMP_HEADER, NONCE_HEADER, CONTENT_SHA256_HEADER, SIGNATURE_HEADER)
_NONCE = re.compile(r"[A-Za-z0-9_-]{8,128}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class AuthError(AutoslimError):
    """A request is not signed with the agent's secret, or is stale or replayed."""


def create_secret(path: str | Path) -> None:
    """Write a new secret (32 random bytes, hex) to ``path`` with mode 0600, atomically.

    Refuses to overwrite an existing file: hosts holding the old secret would be locked out.
    """
    path = Path(path).expanduser()
    if path.exists():
        raise UsageError(
            f"secret file {path} already exists; expected a new path: use it as it is, "
            "or delete it first to make a new secret (then copy it to every host again)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)  # mkstemp already makes it 0600; be explicit
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if path.exists():  # created meanwhile by someone else
            raise UsageError(f"secret file {path} appeared while writing it; expected a new path")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_secret(path: str | Path) -> bytes:
    """The secret in ``path``; refuses a missing file, one that group or others may read or
    write, and a secret shorter than 32 bytes."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UsageError(
            f"agent secret file {path} does not exist; create one with "
            f"`autoslim agent --init-secret {path}` and copy it (mode 0600) to the other host"
        ) from None
    except OSError as e:
        raise UsageError(f"cannot read the agent secret file {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"agent secret {path} is not a regular file; expected a file")
    if st.st_mode & 0o077:
        raise UsageError(
            f"agent secret file {path} has mode {stat.S_IMODE(st.st_mode):04o}, readable or "
            f"writable by group/others; expected 0600: run `chmod 600 {path}`"
        )
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the agent secret file {path}: {e}") from None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        secret = text.encode("ascii")  # a hand-made passphrase: its bytes
    if len(secret) < SECRET_BYTES:
        raise UsageError(
            f"agent secret in {path} has {len(secret)} bytes; expected at least {SECRET_BYTES}: "
            f"make a new one with `autoslim agent --init-secret PATH`"
        )
    return secret


def _message(method: str, path: str, timestamp: str, nonce: str, body_sha256: str) -> bytes:
    return "\n".join([method.upper(), path, timestamp, nonce, body_sha256]).encode("utf-8")


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(
    secret: bytes,
    method: str,
    path: str,
    body: bytes,
    *,
    timestamp: float | None = None,
    nonce: str | None = None,
    body_sha256: str | None = None,
) -> dict[str, str]:
    """The four auth headers of a request (``path`` with its query string, if any).

    ``body_sha256``: the body's SHA-256 hex when the caller already has it (``body`` is then
    not hashed again)."""
    ts = f"{time.time() if timestamp is None else timestamp:.3f}"
    nonce = secrets.token_hex(16) if nonce is None else nonce
    digest = hashlib.sha256(body).hexdigest() if body_sha256 is None else body_sha256.lower()
    return {
        TIMESTAMP_HEADER: ts,
        NONCE_HEADER: nonce,
        CONTENT_SHA256_HEADER: digest,
        SIGNATURE_HEADER: _mac(secret, _message(method, path, ts, nonce, digest)),
    }


def check_body(signed_sha256: str, body_sha256: str) -> None:
    """Raise :class:`AuthError` unless a body's SHA-256 is the one its headers signed."""
    if not hmac.compare_digest(signed_sha256.lower().encode(), body_sha256.lower().encode()):
        raise AuthError(
            f"request body's sha256 is {body_sha256[:64]}, not the signed "
            f"{CONTENT_SHA256_HEADER} {signed_sha256[:64]}; expected the body that was signed "
            "(was it cut short or changed on the way?)"
        )


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


class Verifier:
    """Checks signed requests against one secret, remembering nonces for ``2 * skew`` seconds.

    Thread-safe; memory holds only the nonces of the last ``2 * skew`` seconds, and only those
    of requests whose signature was valid (an unauthenticated client cannot fill it).
    """

    def __init__(self, secret: bytes, *, skew: float = SKEW_S) -> None:
        if len(secret) < SECRET_BYTES:
            raise UsageError(f"agent secret has {len(secret)} bytes; expected >= {SECRET_BYTES}")
        self._secret = secret
        self.skew = skew
        self._seen: set[str] = set()  # nonces accepted in the last 2 * skew seconds
        self._order: deque[tuple[float, str]] = deque()  # (accepted at, nonce), oldest first
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Verifier(skew={self.skew})"  # never the secret

    def verify_headers(self, method: str, path: str, headers: Mapping[str, str]) -> str:
        """Authenticate a request from its headers alone, before its body is read: accept it
        (its nonce is then used up) and return the body's signed SHA-256 (lowercase hex), or
        raise :class:`AuthError` saying why (one line) and remember nothing.

        The caller must then check the body it reads against the returned digest
        (:func:`check_body`) before acting on it."""
        values = {n: _header(headers, n) for n in _HEADERS}
        missing = [n for n, v in values.items() if not v]
        if missing == [CONTENT_SHA256_HEADER]:
            raise AuthError(
                f"request has no {CONTENT_SHA256_HEADER} header: it was signed by an older "
                f"autoslim; expected the body's SHA-256 (hex) in a signed "
                f"{CONTENT_SHA256_HEADER} header: upgrade autoslim on the search host "
                "(pip install -U autoslim) to the agent's version"
            )
        if missing:
            raise AuthError(
                f"unauthenticated request: missing {', '.join(missing)}; expected a request "
                "signed with the agent's secret (use autoslim's remote backend)"
            )
        ts_text, nonce, claimed, signature = (str(values[n]) for n in _HEADERS)
        try:
            ts = float(ts_text)
        except ValueError:
            ts = math.nan
        if not math.isfinite(ts):
            raise AuthError(f"bad {TIMESTAMP_HEADER} {ts_text[:40]!r}; expected Unix seconds")
        if not _NONCE.fullmatch(nonce):
            raise AuthError(f"bad {NONCE_HEADER}; expected 8-128 characters [A-Za-z0-9_-]")
        claimed = claimed.strip()
        if not _SHA256_HEX.fullmatch(claimed):
            raise AuthError(
                f"bad {CONTENT_SHA256_HEADER} {claimed[:80]!r}; expected the body's SHA-256 "
                "as 64 hex digits"
            )
        claimed = claimed.lower()
        expected = _mac(self._secret, _message(method, path, ts_text, nonce, claimed))
        got = signature.strip().lower().encode("utf-8", "replace")
        if not hmac.compare_digest(expected.encode("ascii"), got):
            raise AuthError(
                "bad signature: the request was not signed with this agent's secret; "
                "copy the agent's secret file to the search host (AUTOSLIM_AGENT_SECRET=PATH)"
            )
        now = time.time()
        if abs(now - ts) > self.skew:
            raise AuthError(
                f"request timestamp is {now - ts:+.0f} s off the agent's clock; expected within "
                f"+-{self.skew:g} s: sync the clocks (NTP) of both machines"
            )
        with self._lock:
            horizon = now - 2 * self.skew  # older nonces fail the skew check anyway
            while self._order and self._order[0][0] < horizon:
                self._seen.discard(self._order.popleft()[1])
            if nonce in self._seen:
                raise AuthError(
                    "replayed request: this nonce was already used; expected a fresh "
                    "signature (new nonce) on every request"
                )
            self._seen.add(nonce)
            self._order.append((now, nonce))
        return claimed

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> None:
        """Accept a request whose whole body is at hand or raise :class:`AuthError` saying why
        (one line): :meth:`verify_headers`, then :func:`check_body`. A body that is not the
        signed one still uses up the nonce."""
        claimed = self.verify_headers(method, path, headers)
        check_body(claimed, hashlib.sha256(body).hexdigest())
