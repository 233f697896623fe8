"""The search host's side of a device agent: latency backend ``remote:HOST:PORT``.

:class:`RemoteBackend` uploads the artifact file to the agent (``autoslim agent`` on the
device, :mod:`autoslim.agent.server`) and has it timed there by the same protocol as
:class:`~autoslim.measure.latency.OrtBackend`. Requests are signed with the shared secret
(:mod:`autoslim.measure.auth`) read from the file named by ``AUTOSLIM_AGENT_SECRET``, else
``~/.config/autoslim/agent.secret``. Imports httpx (and the stdlib) only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx

from ..errors import AutoslimError, UsageError, one_line
from .auth import DEFAULT_SECRET_FILE, load_secret, sign
from .latency import RUNTIMES, Latency

__all__ = ["AgentError", "RemoteBackend", "SECRET_ENV"]

SECRET_ENV = "AUTOSLIM_AGENT_SECRET"  # path of the secret file on the search host
BUSY_WAIT_S = 0.5  # first wait after a 409 busy; grows by half each retry, up to BUSY_MAX_S
BUSY_MAX_S = 5.0


class AgentError(AutoslimError):
    """The device agent could not be reached or refused a request (one line, with the fix)."""


def _secret_file(given: str | Path | None = None) -> Path:
    """The secret file: the one given (study file ``agent_secret``, ``--agent-secret``), else
    ``$AUTOSLIM_AGENT_SECRET``, else the agent's default path."""
    env = os.environ.get(SECRET_ENV)
    chosen = given or env
    return Path(chosen).expanduser() if chosen else DEFAULT_SECRET_FILE.expanduser()


class RemoteBackend:
    """Latency measured by a device agent at ``host:port`` (same interface as OrtBackend)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        secret: bytes,
        timeout: float = 120.0,
        retries_busy: int = 30,
        runtime: str = "onnxruntime-cpu",
    ) -> None:
        self.host, self.port, self.runtime = host, int(port), runtime
        self.kind = "pte" if runtime == "executorch-xnnpack" else "onnx"
        suffix = "" if runtime == "onnxruntime-cpu" else f"/{runtime}"
        self.name = f"remote:{host}:{port}{suffix}"
        self.timeout, self.retries_busy = timeout, retries_busy
        self._secret = secret
        netloc = f"[{host}]" if ":" in host and not host.startswith("[") else host
        self.url = f"http://{netloc}:{self.port}"
        self._client: httpx.Client | None = None
        self._info: dict[str, Any] | None = None
        self._stored: set[str] = set()  # models this client uploaded (a 404 uploads again)
        self._hashed: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256

    def __repr__(self) -> str:
        return f"RemoteBackend({self.name!r})"  # never the secret

    def __getstate__(self) -> dict[str, Any]:  # picklable: the connection pool stays behind
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @classmethod
    def from_name(
        cls, name: str, *, check: bool = True, secret_file: str | Path | None = None
    ) -> RemoteBackend:
        """The backend of ``remote:HOST:PORT``; with ``check``, asks the agent once for its
        info, so that an unreachable agent or a wrong secret fails here, before any work."""
        form = "remote:HOST:PORT[/RUNTIME] (e.g. remote:127.0.0.1:8765/openvino-cpu)"
        rest = name[len("remote:") :] if name.startswith("remote:") else ""
        rest, _, runtime = rest.partition("/")
        runtime = runtime or "onnxruntime-cpu"
        host, _, port_text = rest.rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise UsageError(f"bad latency backend {name!r}; expected {form}")
        if runtime not in RUNTIMES:
            raise UsageError(
                f"bad latency backend {name!r}: unknown runtime {runtime!r}; expected one of "
                f"{list(RUNTIMES)} after the '/'"
            )
        secret = load_secret(_secret_file(secret_file))
        backend = cls(host, int(port_text), secret=secret, runtime=runtime)
        if check:
            backend.check_runtime()
        return backend

    def check_runtime(self) -> None:
        """Ask the agent for its info; refuse, in one line, a runtime it does not have."""
        info = self.info()
        runtimes = info.get("runtimes", {"onnxruntime-cpu": info.get("onnxruntime")})
        if self.runtime not in runtimes:
            raise UsageError(
                f"the device agent at {self.host}:{self.port} has no {self.runtime} runtime (it "
                f"has {sorted(runtimes)}); install it there (pip install "
                f"'autoslim[{self.runtime.split('-')[0]}]') and restart the agent, or pick one "
                "of those"
            )

    def version(self) -> str:
        info = self._info if self._info is not None else self.info()
        runtimes = info.get(
            "runtimes", {"onnxruntime-cpu": f"onnxruntime {info.get('onnxruntime')}"}
        )
        return str(runtimes.get(self.runtime, "unknown"))

    # -- HTTP -----------------------------------------------------------------------------

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            self._client = httpx.Client(base_url=self.url, timeout=self.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _hint_unreachable(self) -> str:
        p = self.port
        return (
            f"expected `autoslim agent --port {p}` running on the device and its port forwarded "
            f"here, e.g. `ssh -L {p}:127.0.0.1:{p} device` (or `adb forward tcp:{p} tcp:{p}`)"
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        content: bytes = b"",
        content_type: str | None = None,
        content_sha256: str | None = None,
    ) -> httpx.Response:
        """One signed request (its body's SHA-256, ``content_sha256`` when known, in a signed
        header, so that the agent authenticates it before reading the body); a transport
        failure becomes an AgentError."""
        headers = {"Content-Type": content_type} if content_type else {}
        request = self.client.build_request(method, path, content=content, headers=headers)
        raw_path = request.url.raw_path.decode("ascii")
        request.headers.update(
            sign(self._secret, method, raw_path, content, body_sha256=content_sha256)
        )
        what = f"{method} {path.split('?')[0][:40]}"
        try:
            return self.client.send(request)
        except httpx.ConnectError as e:
            raise AgentError(
                one_line(
                    f"cannot reach the device agent at {self.host}:{self.port} ({what}): "
                    f"{e or 'connection refused'}; {self._hint_unreachable()}"
                )
            ) from None
        except httpx.TimeoutException:
            raise AgentError(
                one_line(
                    f"device agent at {self.host}:{self.port} did not answer {what} within "
                    f"{self.timeout:g} s; expected an answer: is the device overloaded or the "
                    "tunnel down? (RemoteBackend(timeout=...) waits longer)"
                )
            ) from None
        except httpx.HTTPError as e:
            raise AgentError(
                one_line(
                    f"talking to the device agent at {self.host}:{self.port} failed on {what}: "
                    f"{type(e).__name__}: {e}; {self._hint_unreachable()}"
                )
            ) from None

    def _failed(self, method: str, path: str, response: httpx.Response) -> AgentError:
        try:
            text = str(response.json().get("error", ""))
        except (ValueError, AttributeError):
            text = response.text[:200]
        hint = ""
        if response.status_code == 401 and "upgrade autoslim" not in text and "body" not in text:
            hint = (
                f"; expected the agent's secret: point {SECRET_ENV} at a copy of its secret "
                "file, and keep both clocks in sync"
            )
        what = f"{method} {path.split('?')[0][:40]}"
        return AgentError(
            one_line(
                f"device agent at {self.host}:{self.port} answered {what} with HTTP "
                f"{response.status_code}: {text or response.reason_phrase}{hint}"
            )
        )

    def _decode(self, method: str, path: str, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise AgentError(
                f"{self.host}:{self.port} answered {method} {path} with HTTP "
                f"{response.status_code} but not a JSON object; expected an autoslim agent "
                "there: is another server using that port?"
            )
        return data

    def _json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        response = self._send(method, path, **kw)
        if response.status_code >= 400:
            raise self._failed(method, path, response)
        return self._decode(method, path, response)

    # -- the backend ----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """The agent's ``GET /v1/info``: versions, providers, identity, governor, temperature."""
        self._info = self._json("GET", "/v1/info")
        return self._info

    def available(self) -> bool:
        try:
            self.info()
        except AgentError:
            return False
        return True

    def device_identity(self) -> dict[str, Any]:
        """Which device times the trials (host, cpu, cores, and the runtime's optimisation
        level when the agent changes it): part of a study's fingerprint."""
        info = self._info if self._info is not None else self.info()
        identity = dict(info.get("identity", {}))
        if info.get("ort_optimization", "all") != "all":
            identity["ort_optimization"] = info["ort_optimization"]
        return identity

    def _upload(self, path: Path) -> str:
        """PUT ``path`` to the agent unless this client already stored it; its sha256. A file
        already uploaded and unchanged since (size, mtime) is not read again: the teacher's,
        which every timing is paired with, is read and hashed once per search, not per trial."""
        try:
            st = path.stat()
            key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
            if self._hashed.get(key) in self._stored:
                return self._hashed[key]
            data = path.read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read the artifact {path}: {e.strerror}") from None
        sha = hashlib.sha256(data).hexdigest()
        self._hashed[key] = sha
        if sha in self._stored:
            return sha
        info = self._info if self._info is not None else self.info()
        cap = info.get("max_upload")
        if isinstance(cap, int) and len(data) > cap:
            raise AgentError(
                f"artifact {path.name} has {len(data)} bytes, over the upload cap of {cap} of "
                f"the device agent at {self.host}:{self.port}; restart the agent with a larger "
                "--max-upload-mb"
            )
        put = f"/v1/models/{sha}"
        response = self._send(
            "PUT", put, content=data, content_type="application/octet-stream", content_sha256=sha
        )
        if response.status_code not in (200, 201):
            raise self._failed("PUT", put, response)
        self._stored.add(sha)
        return sha

    def measure(
        self,
        artifact: Path,
        *,
        input_shape: tuple[int, ...],
        runs: int = 200,
        warmup: int = 20,
        reference: Path | None = None,
    ) -> Latency:
        """Upload ``artifact`` (and ``reference``: once per content), have the agent time it
        (paired with ``reference`` when given) and return that."""
        paths = [Path(artifact)] + ([Path(reference)] if reference is not None else [])
        for attempt in range(2):  # a restarted agent with another store: upload again
            shas = [self._upload(p) for p in paths]
            request = {
                "sha256": shas[0],
                "input_shape": [int(d) for d in input_shape],
                "runs": int(runs),
                "warmup": int(warmup),
            }
            if self.runtime != "onnxruntime-cpu":  # older agents know no such field
                request["runtime"] = self.runtime
            if reference is not None:
                request["reference"] = shas[1]
            response = self._measure(json.dumps(request).encode())
            if response.status_code != 404 or attempt:
                break
            self._stored.clear()
        if response.status_code != 200:
            error = self._failed("POST", "/v1/measure", response)
            if response.status_code == 409:
                error = AgentError(
                    f"{error} (still busy after {self.retries_busy} retries; is another "
                    "search using this device?)"
                )
            raise error
        lat = Latency.from_dict(self._decode("POST", "/v1/measure", response))
        return dataclasses.replace(lat, backend=self.name)

    def _measure(self, body: bytes) -> httpx.Response:
        """POST /v1/measure, waiting while the agent is busy (409) up to ``retries_busy``."""
        wait = BUSY_WAIT_S
        for attempt in range(self.retries_busy + 1):
            response = self._send(
                "POST", "/v1/measure", content=body, content_type="application/json"
            )
            if response.status_code != 409 or attempt == self.retries_busy:
                break
            time.sleep(wait)
            wait = min(wait * 1.5, BUSY_MAX_S)
        return response
