"""The device agent: an HTTP server on the target device that times ONNX files for the search.

Run ``autoslim agent`` on the device (it listens on 127.0.0.1:8765; reach it from the search
host with ``ssh -L 8765:127.0.0.1:8765 device`` or ``adb forward tcp:8765 tcp:8765``) and give
the study ``backend = "remote:127.0.0.1:8765"``. Every request is signed with the shared
secret (:mod:`autoslim.measure.auth`); the agent imports numpy, onnxruntime, starlette and
uvicorn only, never torch or optuna.

Endpoints (JSON; every error is ``{"error": "one line"}``):

* ``GET /v1/info``: versions, providers, the device's identity, CPU governor and temperature.
* ``PUT /v1/models/{sha256}``: the ONNX file as the raw body; 201 stored, 200 already stored,
  400 bad or mismatched sha256, 413 over the upload cap, 422 onnxruntime cannot load it.
* ``POST /v1/measure``: ``{"sha256", "input_shape", "runs", "warmup", "provider",
  "threads"}`` -> :meth:`Latency.to_dict`; 400 bad field, 404 unknown model, 409 busy
  (``"retry": true``), 422 the measurement failed.

Any request not signed with the secret, stale by more than 60 s or replayed gets 401 and
changes nothing; the signature covers the body's SHA-256 (a signed header), so that 401 comes
from the headers alone, before any of the body is read (then the connection is closed). A
signed request's body is read under its cap (413 past it) and refused (401) unless it hashes to
the signed SHA-256. ``--host`` other than loopback is refused unless ``--allow-remote``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import AutoslimError, UsageError, first_line, one_line
from ..measure.auth import (
    DEFAULT_SECRET_FILE,
    AuthError,
    Verifier,
    check_body,
    create_secret,
    load_secret,
)
from ..measure.backends import available_runtimes, get_backend
from ..measure.executorch import is_pte
from ..measure.latency import host_identity
from ..measure.ort import OPTIMIZATIONS, OrtBackend

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_STORE",
    "DEFAULT_MAX_UPLOAD",
    "DEFAULT_THREADS",
    "create_app",
    "is_loopback",
    "serve",
    "main",
]

DEFAULT_HOST = "127.0.0.1"  # across machines: ssh -L / adb forward, never an open port
DEFAULT_PORT = 8765
DEFAULT_STORE = Path("~/.cache/autoslim/agent-models")
DEFAULT_MAX_UPLOAD = 256 * 2**20
DEFAULT_THREADS = 1  # intra-op threads of a measurement unless the request says otherwise
MAX_RUNS = 100_000
MAX_DIM = 65_536
MAX_ELEMENTS = 2**27  # one float32 input of at most 512 MiB
MAX_JSON_BODY = 64 * 2**10  # the body of any request but an upload (a measure request: ~200 B)
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_ENDPOINTS = "GET /v1/info, PUT /v1/models/SHA256, POST /v1/measure"


def _version() -> str:
    """autoslim's version without importing torch (the package ``__init__`` is lazy)."""
    try:
        from autoslim import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - a broken install
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("autoslim")
        except PackageNotFoundError:
            return "unknown"


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def cpu_governor() -> str | None:
    """cpu0's frequency governor (``performance`` gives steadier timings), or None."""
    return _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor") or None


def temperature_c() -> float | None:
    """The hottest thermal zone in degrees Celsius, or None where none is readable."""
    temps = []
    for zone in sorted(glob.glob("/sys/class/thermal/thermal_zone*/temp")):
        text = _read(zone)
        try:
            value = int(text) / 1000 if text else math.nan
        except ValueError:
            continue
        if math.isfinite(value) and -50 < value < 200:  # ignore unplugged sensors' junk
            temps.append(value)
    return round(max(temps), 1) if temps else None


def _error(status: int, message: str, *, close: bool = False, **extra: Any) -> JSONResponse:
    """The JSON error answer; ``close``: and close the connection (a body left unread)."""
    headers = {"Connection": "close"} if close else None
    return JSONResponse({"error": one_line(message), **extra}, status_code=status, headers=headers)


class _SignedBody:
    """ASGI middleware: authenticates every request from its headers alone (else 401) before
    it receives one byte of the body; then reads the body under its cap (else 413), hashing it
    as it comes, and refuses it (401) unless it is the body whose SHA-256 the headers signed.
    Only then does an endpoint run, reading the same bytes.

    A refusal sent before the body is read closes the connection, so the client stops sending
    (what it already sent is dropped by the kernel, never buffered here)."""

    def __init__(self, app: ASGIApp, *, verifier: Verifier, max_upload: int) -> None:
        self.app, self.verifier, self.max_upload = app, verifier, max_upload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets are off in serve(); refuse any that comes
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method = scope["method"]
        raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw_path.decode("latin-1")
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        try:  # from the headers alone: no body is received before this passes
            signed_sha256 = self.verifier.verify_headers(method, path, headers)
        except AuthError as e:
            await _error(401, str(e), close=True)(scope, receive, send)
            return
        # an upload takes up to max_upload; any other request a small JSON body at most
        if method == "PUT" and scope["path"].startswith("/v1/models/"):
            cap, what = self.max_upload, "the agent's upload cap"
            fix = "expected a smaller ONNX file, or restart the agent with a larger --max-upload-mb"
        else:
            cap, what = MAX_JSON_BODY, f"the agent's cap for {method} {scope['path'][:40]}"
            fix = "expected a small JSON request (use autoslim's remote backend)"
        too_big = _error(413, f"request body over {what} of {cap} bytes; {fix}", close=True)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap:
            await too_big(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        digest = hashlib.sha256()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                await too_big(scope, receive, send)
                return
            digest.update(chunk)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            check_body(signed_sha256, digest.hexdigest())
        except AuthError as e:
            await _error(401, str(e))(scope, receive, send)  # the body was read: keep-alive
            return
        body = b"".join(chunks)
        del chunks
        scope.setdefault("state", {})["body_sha256"] = signed_sha256
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class _Agent:
    """The endpoints and the one-measurement-at-a-time lock."""

    def __init__(self, store: Path, max_upload: int, optimization: str = "all") -> None:
        self.store, self.max_upload, self.optimization = store, max_upload, optimization
        self.lock = threading.Lock()
        self.providers = list(ort.get_available_providers())
        self.runtimes = available_runtimes()  # name -> version, of the runtimes installed here
        self.identity = host_identity()
        self.version = _version()

    def device(self, provider: str, threads: int) -> dict[str, Any]:
        return {
            **self.identity,
            "agent": f"autoslim {self.version}",
            "onnxruntime": ort.__version__,
            "provider": provider,
            "threads": threads,
            **({"ort_optimization": self.optimization} if self.optimization != "all" else {}),
        }

    async def info(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "agent": "autoslim",
                "version": self.version,
                "onnxruntime": ort.__version__,
                "providers": self.providers,
                "runtimes": self.runtimes,
                "identity": self.identity,
                "threads": DEFAULT_THREADS,
                "ort_optimization": self.optimization,
                "cpu_governor": cpu_governor(),
                "temperature_c": temperature_c(),
                "max_upload": self.max_upload,
                "busy": self.lock.locked(),
            }
        )

    async def put_model(self, request: Request) -> JSONResponse:
        sha = request.path_params["sha256"]
        if not _SHA256.fullmatch(sha):
            return _error(400, f"bad model id {sha[:80]!r}; expected 64 hex digits (sha256)")
        sha = sha.lower()
        body = await request.body()
        got = request.scope.get("state", {}).get("body_sha256")  # checked by _SignedBody
        if got is None:  # pragma: no cover - the app always runs behind _SignedBody
            got = hashlib.sha256(body).hexdigest()
        if got != sha:
            return _error(
                400,
                f"upload's sha256 is {got}, not {sha} named in the path; expected the file's "
                "own sha256 (was it cut short or changed?)",
            )
        pte = is_pte(body[:8])
        target = self.store / f"{sha}.{'pte' if pte else 'onnx'}"
        if target.is_file():
            return JSONResponse({"sha256": sha, "size": len(body), "stored": False}, 200)
        if pte and "executorch-xnnpack" not in self.runtimes:
            return _error(
                422,
                "the upload is an ExecuTorch .pte program, but this agent has no ExecuTorch "
                "runtime; install it on the device (pip install 'autoslim[executorch]') and "
                "restart the agent",
            )
        try:
            await run_in_threadpool(_check_pte if pte else _check_onnx, body)
        except Exception as e:
            what = "an ExecuTorch .pte program" if pte else "an ONNX file with its weights inside"
            return _error(
                422,
                f"{'executorch' if pte else 'onnxruntime'} cannot load the uploaded model: "
                f"{first_line(e)}; expected {what}",
            )
        await run_in_threadpool(_store, self.store, target, body)
        return JSONResponse({"sha256": sha, "size": len(body), "stored": True}, 201)

    async def measure(self, request: Request) -> JSONResponse:
        try:
            req = _measure_request(await request.body(), self.providers, self.runtimes)
        except ValueError as e:
            return _error(400, str(e))
        ext = "pte" if req["runtime"] == "executorch-xnnpack" else "onnx"
        path = self.store / f"{req['sha256']}.{ext}"
        ref = self.store / f"{req['reference']}.{ext}" if req["reference"] else None
        for sha, p in ((req["sha256"], path), (req["reference"], ref)):
            if p is not None and not p.is_file():
                other = p.with_suffix(".onnx" if ext == "pte" else ".pte")
                if other.is_file():
                    return _error(
                        422,
                        f"model {sha[:12]} is {'an ONNX file' if ext == 'pte' else 'a .pte program'}"
                        f", but runtime {req['runtime']} runs {'.pte programs' if ext == 'pte' else 'ONNX files'}; "
                        "upload the artifact exported for that runtime",
                    )
                return _error(
                    404,
                    f"model {sha} is not stored on this agent; expected "
                    f"PUT /v1/models/{sha} with the file first",
                )
        if not self.lock.acquire(blocking=False):
            return _error(
                409,
                "busy: another measurement is running on this device; retry when it is done",
                retry=True,
            )
        try:
            if req["runtime"].startswith("onnxruntime"):
                backend = OrtBackend(req["provider"], req["threads"], self.optimization)
            else:
                backend = get_backend(req["runtime"])
                backend.threads = req["threads"]
            lat = await run_in_threadpool(
                backend.measure,
                path,
                input_shape=tuple(req["input_shape"]),
                runs=req["runs"],
                warmup=req["warmup"],
                reference=ref,
            )
        except Exception as e:
            return _error(
                422,
                f"measuring {req['sha256'][:12]} with input_shape {req['input_shape']} failed: "
                f"{first_line(e)}",
            )
        finally:
            self.lock.release()
        out = lat.to_dict()
        out["device"] = {
            **(lat.device or {}),
            **self.device(req["provider"], req["threads"]),
            "backend": lat.backend,
            "runtime": self.runtimes.get(req["runtime"], req["runtime"]),
        }
        return JSONResponse(out, 200)


def _check_onnx(body: bytes) -> None:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = 1
    ort.InferenceSession(body, so, providers=["CPUExecutionProvider"])


def _check_pte(body: bytes) -> None:
    from ..measure.executorch import load_method

    with tempfile.NamedTemporaryFile(suffix=".pte") as f:
        f.write(body)
        f.flush()
        load_method(f.name)


def _store(store: Path, target: Path, body: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem[:16]}.", suffix=".tmp", dir=store)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _int_field(req: dict, name: str, default: int, low: int, high: int) -> int:
    value = req.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"bad field {name!r}: {value!r}; expected an integer in {low}..{high}")
    return value


def _measure_request(
    body: bytes, providers: list[str], runtimes: dict[str, str] | None = None
) -> dict[str, Any]:
    """The fields of a measure request, checked; ValueError names the bad field."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON body: {e}; expected a JSON object") from None
    if not isinstance(req, dict):
        raise ValueError(f"JSON body is a {type(req).__name__}; expected an object")
    known = {
        "sha256",
        "input_shape",
        "runs",
        "warmup",
        "provider",
        "threads",
        "reference",
        "runtime",
    }
    unknown = sorted(set(req) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; expected only {sorted(known)}")
    sha = req.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"bad field 'sha256': {str(sha)[:80]!r}; expected 64 hex digits")
    ref = req.get("reference")
    if ref is not None and (not isinstance(ref, str) or not _SHA256.fullmatch(ref)):
        raise ValueError(
            f"bad field 'reference': {str(ref)[:80]!r}; expected the 64 hex digits of a stored "
            "model (timed in blocks paired with the model's)"
        )
    shape = req.get("input_shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 4
        or any(
            isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DIM for d in shape
        )
    ):
        raise ValueError(
            f"bad field 'input_shape': {str(shape)[:80]}; expected a list of 1 to 4 positive "
            f"integers (without the batch), e.g. [3, 224, 224]"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(
            f"bad field 'input_shape': {shape} has {math.prod(shape)} elements; expected at "
            f"most {MAX_ELEMENTS}"
        )
    provider = req.get("provider", "CPUExecutionProvider")
    if provider not in providers:
        raise ValueError(
            f"bad field 'provider': {str(provider)[:80]!r}; expected one of this device's "
            f"{providers}"
        )
    runtime = req.get(
        "runtime", "onnxruntime-cuda" if provider.startswith("CUDA") else "onnxruntime-cpu"
    )
    runtimes = runtimes if runtimes is not None else {"onnxruntime-cpu": ""}
    if runtime not in runtimes:
        raise ValueError(
            f"bad field 'runtime': {str(runtime)[:80]!r}; this device has {sorted(runtimes)} "
            f"(install another with pip install 'autoslim[{str(runtime).split('-')[0][:20]}]' "
            "and restart the agent)"
        )
    return {
        "runtime": runtime,
        "sha256": sha.lower(),
        "reference": ref.lower() if ref else None,
        "input_shape": shape,
        "runs": _int_field(req, "runs", 200, 1, MAX_RUNS),
        "warmup": _int_field(req, "warmup", 20, 0, MAX_RUNS),
        "provider": provider,
        "threads": _int_field(req, "threads", DEFAULT_THREADS, 1, max(1, os.cpu_count() or 1)),
    }


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        message = f"no endpoint {where}; expected one of {_ENDPOINTS}"
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        message = f"method not allowed: {where}; expected {allowed or 'another method'}"
    else:
        message = f"{where}: {exc.detail}"
    return JSONResponse(
        {"error": one_line(message)}, status_code=exc.status_code, headers=exc.headers
    )


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    message = f"internal error in the agent on {request.method} {request.url.path}: "
    return _error(500, message + f"{type(exc).__name__}: {first_line(exc)}; see its log")


def create_app(
    *,
    secret: bytes,
    store: Path,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    optimization: str = "all",
) -> Starlette:
    """The agent's ASGI app: models are kept in ``store`` as ``<sha256>.onnx``; every session
    uses ONNX Runtime graph optimisation level ``optimization`` (part of the device identity
    when not ``all``)."""
    if max_upload < 1:
        raise UsageError(f"max_upload must be >= 1 byte; got {max_upload}")
    if optimization not in OPTIMIZATIONS:
        raise UsageError(f"optimization must be one of {OPTIMIZATIONS}; got {optimization!r}")
    store = Path(store).expanduser()
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    verifier = Verifier(secret)
    agent = _Agent(store, max_upload, optimization)
    routes = [
        Route("/v1/info", agent.info, methods=["GET"]),
        Route("/v1/models/{sha256}", agent.put_model, methods=["PUT"]),
        Route("/v1/measure", agent.measure, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_SignedBody, verifier=verifier, max_upload=max_upload)],
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )


def _listen(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(
            f"cannot resolve --host {host!r}: {e.strerror}; expected an address or host name"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port}: {e.strerror}; expected a free port: pick another "
            "with --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only: 127.0.0.0/8, ::1 or ``localhost``."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False  # another host name: it may resolve to any interface
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_host(host: str, port: int = DEFAULT_PORT, *, allow_remote: bool = False) -> None:
    """Refuse (UsageError, exit 2) a ``host`` other than loopback unless ``allow_remote``."""
    if allow_remote or is_loopback(host):
        return
    p = port or DEFAULT_PORT
    raise UsageError(
        f"--host {host!r} is not a loopback address (the agent would be reachable from other "
        f"machines); expected 127.0.0.1 (or ::1, localhost), reached from the search host "
        f"through `ssh -L {p}:127.0.0.1:{p} device` (or `adb forward tcp:{p} tcp:{p}`), or "
        "pass --allow-remote to listen there anyway (requests are signed but not encrypted)"
    )


def serve(
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    secret_file: str | Path = DEFAULT_SECRET_FILE,
    store: str | Path = DEFAULT_STORE,
    max_upload: int = DEFAULT_MAX_UPLOAD,
    optimization: str = "all",
    allow_remote: bool = False,
) -> None:
    """Serve the agent until Ctrl-C / SIGTERM (uvicorn, log level ``warning``). A ``host``
    other than loopback is refused (UsageError, before anything is bound) unless
    ``allow_remote``."""
    check_host(host, port, allow_remote=allow_remote)
    secret = load_secret(secret_file)
    store = Path(store).expanduser()
    app = create_app(secret=secret, store=store, max_upload=max_upload, optimization=optimization)
    sock = _listen(host, port)  # bound here, so the line below is true and errors are ours
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"autoslim agent: listening on http://{shown}:{bound}, models in {store}",
        file=sys.stderr,
        flush=True,
    )
    if not is_loopback(host):  # --allow-remote
        print(
            "autoslim agent: warning: reachable from other machines; requests are signed but "
            f"not encrypted: prefer --host 127.0.0.1 and `ssh -L {bound}:127.0.0.1:{bound} "
            "device` on the search host",
            file=sys.stderr,
            flush=True,
        )
    # no websockets: every request is plain HTTP through _SignedBody
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none")
    # Ctrl-C is a KeyboardInterrupt wherever it lands (exit 130): uvicorn shuts down gracefully
    # on it, then re-raises it into the handler it found; left to asyncio's runner, that one
    # only cancels the main task, and under load the interrupt was lost (exit 0)
    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGINT, _interrupted)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535; got {text!r}")
    return value


def _megabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of MiB; got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) that names the help to read."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"autoslim agent: error: {message} (see `autoslim agent --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="autoslim agent",
        description=(
            "Measure the latency of ONNX files sent by an autoslim search, on this device. "
            "Reach it from the search host with `ssh -L PORT:127.0.0.1:PORT device` "
            "(or `adb forward tcp:PORT tcp:PORT`) and use backend remote:127.0.0.1:PORT."
        ),
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}); other than loopback needs --allow-remote",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback (127.0.0.0/8, ::1, localhost): the agent is "
        "then reachable from other machines, signed but not encrypted; prefer ssh -L",
    )
    p.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})"
    )
    p.add_argument(
        "--secret",
        default=str(DEFAULT_SECRET_FILE),
        metavar="FILE",
        help=f"shared secret file, mode 0600 (default {DEFAULT_SECRET_FILE})",
    )
    p.add_argument(
        "--store",
        default=str(DEFAULT_STORE),
        metavar="DIR",
        help=f"where uploaded models are kept (default {DEFAULT_STORE})",
    )
    p.add_argument(
        "--max-upload-mb",
        type=_megabytes,
        default=DEFAULT_MAX_UPLOAD / 2**20,
        metavar="N",
        help="largest model upload in MiB (default 256)",
    )
    p.add_argument(
        "--ort-optimization",
        choices=OPTIMIZATIONS,
        default="all",
        help="ONNX Runtime graph optimisation level (default all; 'basic' runs int8 files "
        "without fused int8 kernels, like a runtime that has none)",
    )
    p.add_argument(
        "--init-secret",
        metavar="FILE",
        help="create a new secret file (mode 0600) and exit; copy it to the search host",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """``autoslim agent ...``; returns the exit code (0, 1, 2, 130 after Ctrl-C)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (argparse printed why)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.init_secret:
            path = Path(args.init_secret).expanduser()
            create_secret(path)
            print(path)
            print(
                "autoslim agent: secret created; copy it (mode 0600) to the search host and "
                "set AUTOSLIM_AGENT_SECRET to its path there",
                file=sys.stderr,
            )
            return 0
        serve(
            host=args.host,
            port=args.port,
            secret_file=args.secret,
            store=args.store,
            max_upload=max(1, int(args.max_upload_mb * 2**20)),
            optimization=args.ort_optimization,
            allow_remote=args.allow_remote,
        )
        return 0
    except KeyboardInterrupt:
        return 130
    except AutoslimError as e:
        print(f"autoslim agent: error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.filename:  # a path given (--store, --secret, --init-secret) that cannot be used
            print(
                f"autoslim agent: error: cannot use {e.filename}: {e.strerror}; expected a path "
                "this user can read and write (a folder for --store, a file for --secret): "
                "fix it or pass another path",
                file=sys.stderr,
            )
            return 2
        print(f"autoslim agent: error: {one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
