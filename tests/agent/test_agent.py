"""The device agent: a real ``autoslim agent`` process, signed requests and the remote backend.

Every test talks HTTP to an agent subprocess started on a free port with a secret and a model
store in a temporary directory; ONNX files are built with ``onnx.helper`` (no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from autoslim.errors import AutoslimError, UsageError
from autoslim.measure import Latency, get_backend
from autoslim.measure.auth import (
    CONTENT_SHA256_HEADER,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AuthError,
    Verifier,
    check_body,
    create_secret,
    load_secret,
    sign,
)
from autoslim.measure.remote import AgentError, RemoteBackend

REPO = Path(__file__).resolve().parent.parent.parent


def onnx_model(seed: int = 0, channels: int = 16) -> bytes:
    """Conv 3x3 + Relu + GlobalAveragePool on a float input ``x`` of [1, 3, 32, 32]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((channels, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(channels).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 1, 1])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Agent:
    proc: subprocess.Popen
    port: int
    secret: bytes
    secret_file: Path
    store: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def files(self) -> list[str]:
        return sorted(p.name for p in self.store.iterdir())

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        secret: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> httpx.Response:
        """A request signed with ``secret`` (the agent's by default) unless ``headers`` given."""
        if headers is None:
            headers = sign(secret or self.secret, method, path, body)
        return httpx.request(
            method, self.url + path, content=body, headers=headers, timeout=timeout
        )

    def backend(self) -> RemoteBackend:
        return RemoteBackend("127.0.0.1", self.port, secret=self.secret)


def start_agent(base: Path, *extra: str) -> Agent:
    base.mkdir(parents=True, exist_ok=True)
    secret_file, store, log = base / "agent.secret", base / "models", base / "agent.log"
    create_secret(secret_file)
    args = ["--port", "0", "--secret", str(secret_file), "--store", str(store), *extra]
    code = f"from autoslim.agent.server import main; raise SystemExit(main({args!r}))"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=err, cwd=REPO)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text()
        if "listening on http://" in text:
            port = int(text.split("listening on http://127.0.0.1:")[1].split(",")[0])
            agent = Agent(proc, port, load_secret(secret_file), secret_file, store, log)
            assert agent.request("GET", "/v1/info").status_code == 200
            return agent
        if proc.poll() is not None:
            raise AssertionError(f"agent exited with {proc.returncode}: {text}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"agent did not start within 60 s: {log.read_text()}")


def stop(agent: Agent) -> None:
    if agent.proc.poll() is None:
        agent.proc.terminate()
        try:
            agent.proc.wait(10)
        except subprocess.TimeoutExpired:
            agent.proc.kill()
            agent.proc.wait()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("agent"))
    yield a
    stop(a)


@pytest.fixture(scope="module")
def tiny_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    """An agent that takes uploads of at most 0.01 MiB (10485 bytes)."""
    a = start_agent(tmp_path_factory.mktemp("tiny-agent"), "--max-upload-mb", "0.01")
    yield a
    stop(a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what the device installs -------------------------------------------------------------


@pytest.mark.parametrize(
    "module", ["autoslim.agent.server", "autoslim.measure.remote", "autoslim.measure.predictor"]
)
def test_imports_neither_torch_nor_optuna(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('torch', 'optuna') if m in sys.modules]; "
        "assert not bad, bad"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr


# -- measuring through the remote backend ---------------------------------------------------


def test_remote_backend_measures_on_the_agent(agent: Agent, tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(onnx_model(1))
    backend = agent.backend()
    assert backend.name == f"remote:127.0.0.1:{agent.port}"
    assert backend.available()
    assert "secret" not in repr(backend) and agent.secret.hex() not in repr(backend)
    lat = backend.measure(path, input_shape=(3, 32, 32), runs=60, warmup=5)
    assert isinstance(lat, Latency)
    assert lat.backend == backend.name
    assert 0 < lat.runs <= 60
    assert 0 < lat.ci_low_ms <= lat.median_ms <= lat.ci_high_ms
    assert lat.median_ms <= lat.p90_ms
    for key in ("host", "cpu", "cores", "agent", "onnxruntime", "provider", "threads"):
        assert key in lat.device, lat.device
    assert lat.device["provider"] == "CPUExecutionProvider" and lat.device["threads"] == 1
    assert backend.device_identity() == {k: lat.device[k] for k in ("host", "cpu", "cores")}
    assert agent.files() == [f"{sha(path.read_bytes())}.onnx"]
    # the same file again: already stored (200), measured again
    again = backend.measure(path, input_shape=(3, 32, 32), runs=20, warmup=1)
    assert again.runs > 0 and agent.files() == [f"{sha(path.read_bytes())}.onnx"]
    assert Latency.from_dict(json.loads(json.dumps(lat.to_dict()))) == lat


def test_get_backend_remote_reads_the_secret_file_named_by_env(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOSLIM_AGENT_SECRET", str(agent.secret_file))
    backend = get_backend(f"remote:127.0.0.1:{agent.port}")
    assert isinstance(backend, RemoteBackend)
    assert backend.info()["providers"]
    with pytest.raises(UsageError, match=r"expected remote:HOST:PORT"):
        RemoteBackend.from_name("remote:127.0.0.1")
    with pytest.raises(UsageError, match=r"expected remote:HOST:PORT"):
        RemoteBackend.from_name("remote:host:99999")


def test_a_study_names_the_secret_file_and_never_stores_the_secret(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``agent_secret = PATH`` in a study file (``--agent-secret``) wins over the environment;
    the study stores the path, never the secret's bytes."""
    from autoslim.study.spec import load_study_spec

    monkeypatch.setenv("AUTOSLIM_AGENT_SECRET", str(tmp_path / "missing"))
    backend = get_backend(f"remote:127.0.0.1:{agent.port}", secret_file=agent.secret_file)
    assert backend.info()["providers"]
    with pytest.raises(UsageError, match="does not exist") as e:
        get_backend(f"remote:127.0.0.1:{agent.port}")  # the environment's missing file
    assert "\n" not in str(e.value) and "--init-secret" in str(e.value)
    spec = load_study_spec(
        None, backend=f"remote:127.0.0.1:{agent.port}", agent_secret=str(agent.secret_file)
    )
    stored = json.dumps(spec.to_dict())
    assert str(agent.secret_file) in stored and agent.secret.hex() not in stored
    assert agent.secret.hex() not in repr(spec.to_dict()) + repr(backend)


def test_info_reports_the_device(agent: Agent) -> None:
    r = agent.request("GET", "/v1/info")
    assert r.status_code == 200
    info = r.json()
    import onnxruntime

    assert info["onnxruntime"] == onnxruntime.__version__
    assert "CPUExecutionProvider" in info["providers"]
    assert set(info["identity"]) == {"host", "cpu", "cores"}
    assert info["threads"] == 1 and info["version"]
    assert "cpu_governor" in info and "temperature_c" in info  # null where unreadable
    assert info["temperature_c"] is None or -50 < info["temperature_c"] < 200


# -- authentication ---------------------------------------------------------------------------


def test_unsigned_wrong_secret_replayed_and_stale_requests_get_401(agent: Agent) -> None:
    data = onnx_model(2)
    path = f"/v1/models/{sha(data)}"
    before = agent.files()
    cases = {
        "no headers": agent.request("PUT", path, data, headers={}),
        "wrong secret": agent.request("PUT", path, data, secret=os.urandom(32)),
        "stale": agent.request(
            "PUT",
            path,
            data,
            headers=sign(agent.secret, "PUT", path, data, timestamp=time.time() - 120),
        ),
        "other body": agent.request(
            "PUT", path, data, headers=sign(agent.secret, "PUT", path, data + b"x")
        ),
        "other path": agent.request(
            "PUT", path, data, headers=sign(agent.secret, "PUT", "/v1/info", data)
        ),
    }
    for what, r in cases.items():
        assert r.status_code == 401, (what, r.text)
        assert "error" in r.json() and "\n" not in r.json()["error"]
    assert "missing" in cases["no headers"].json()["error"]
    assert "clock" in cases["stale"].json()["error"]
    assert agent.files() == before  # nothing stored

    headers = sign(agent.secret, "PUT", path, data)
    assert agent.request("PUT", path, data, headers=headers).status_code == 201
    stored = agent.files()
    replay = agent.request("PUT", path, data, headers=headers)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]
    assert agent.files() == stored
    info = sign(agent.secret, "GET", "/v1/info", b"")
    assert agent.request("GET", "/v1/info", headers=info).status_code == 200
    assert agent.request("GET", "/v1/info", headers=info).status_code == 401


def test_unknown_path_and_wrong_method_answer_json(agent: Agent) -> None:
    assert agent.request("GET", "/v1/nope", headers={}).status_code == 401  # auth comes first
    r = agent.request("GET", "/v1/nope")
    assert r.status_code == 404 and "/v1/info" in r.json()["error"]
    r = agent.request("DELETE", "/v1/info")
    assert r.status_code == 405 and "GET" in r.json()["error"]
    r = agent.request("GET", "/v1/measure")
    assert r.status_code == 405 and "POST" in r.json()["error"]


def test_verifier_forgets_old_nonces() -> None:
    secret = os.urandom(32)
    v = Verifier(secret, skew=1)
    for _ in range(5):
        v.verify("GET", "/v1/info", sign(secret, "GET", "/v1/info", b""), b"")
    assert len(v._seen) == 5
    time.sleep(2.1)
    v.verify("GET", "/v1/info", sign(secret, "GET", "/v1/info", b""), b"")
    assert len(v._seen) == 1
    future = sign(secret, "GET", "/v1/info", b"", timestamp=time.time() + 5)
    with pytest.raises(AuthError, match="clock"):
        v.verify("GET", "/v1/info", future, b"")
    lower = {k.lower(): val for k, val in sign(secret, "GET", "/", b"").items()}
    v.verify("GET", "/", lower, b"")  # header names are case-insensitive
    assert set(sign(secret, "GET", "/", b"")) == {
        TIMESTAMP_HEADER,
        NONCE_HEADER,
        CONTENT_SHA256_HEADER,
        SIGNATURE_HEADER,
    }


def test_verifier_authenticates_from_the_headers_alone() -> None:
    """The signature covers the body's claimed SHA-256 (a header): the headers are checked
    without the body, a nonce is used up only by a valid signature, and the body is checked
    against the signed digest afterwards."""
    secret = os.urandom(32)
    v = Verifier(secret)
    body = b"some body" * 100
    headers = sign(secret, "PUT", "/v1/models/x", body)
    assert headers[CONTENT_SHA256_HEADER] == sha(body)
    # a wrong signature, a stale one and a bad digest use up nothing: the same nonce passes later
    nonce = headers[NONCE_HEADER]
    bad = {**headers, SIGNATURE_HEADER: "0" * 64}
    stale = sign(secret, "PUT", "/v1/models/x", body, nonce=nonce, timestamp=time.time() - 300)
    for refused, match in [
        (bad, "bad signature"),
        (stale, "clock"),
        ({**headers, CONTENT_SHA256_HEADER: "xyz"}, "64 hex"),
        ({**headers, CONTENT_SHA256_HEADER: sha(b"other")}, "bad signature"),  # claim is signed
    ]:
        with pytest.raises(AuthError, match=match) as e:
            v.verify_headers("PUT", "/v1/models/x", refused)
        assert "\n" not in str(e.value)
    assert v._seen == set()
    assert v.verify_headers("PUT", "/v1/models/x", headers) == sha(body)
    assert v._seen == {nonce}
    with pytest.raises(AuthError, match="replayed"):
        v.verify_headers("PUT", "/v1/models/x", headers)
    check_body(sha(body), sha(body).upper())
    with pytest.raises(AuthError, match="not the signed") as e:
        check_body(sha(body), sha(body + b"x"))
    assert CONTENT_SHA256_HEADER in str(e.value)
    # the whole-body form: a body other than the signed one still uses up its nonce (safe)
    other = sign(secret, "PUT", "/p", body)
    with pytest.raises(AuthError, match="not the signed"):
        v.verify("PUT", "/p", other, body + b"x")
    with pytest.raises(AuthError, match="replayed"):
        v.verify("PUT", "/p", other, body)
    # a signature over a precomputed digest is the same signature
    fixed = {"timestamp": 1.0, "nonce": "n" * 16}
    assert sign(secret, "PUT", "/p", body, **fixed) == sign(
        secret, "PUT", "/p", b"", body_sha256=sha(body).upper(), **fixed
    )
    # an older client signed the same message but sent no digest header: told to upgrade
    old = {k: val for k, val in sign(secret, "GET", "/v1/info", b"").items()}
    del old[CONTENT_SHA256_HEADER]
    with pytest.raises(AuthError, match="upgrade autoslim on the search host") as e:
        v.verify_headers("GET", "/v1/info", old)
    assert CONTENT_SHA256_HEADER in str(e.value)


# -- authentication before the body -----------------------------------------------------------

BIG_CHUNK = 2**20  # 1 MiB
BIG_CHUNKS = 128  # a 128 MiB upload, under the default 256 MiB cap


def memory_mib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024
    return out


class PeakRss:
    """The peak RSS of a process over a ``with`` block: VmHWM after resetting it through
    /proc/PID/clear_refs, else the largest VmRSS sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.start = pid, 0, 0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.start = memory_mib(self.pid)["VmRSS"]
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        except OSError:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        deadline = time.monotonic() + 120
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.peak = max(self.peak, memory_mib(self.pid)["VmRSS"])
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join(10)
        else:
            self.peak = memory_mib(self.pid)["VmHWM"]

    @property
    def growth(self) -> int:
        return self.peak - self.start


def raw_request(port: int, head: str, first: bytes, *, timeout: float = 15.0) -> bytes:
    """Send a request's head and the first bytes of its body (not the rest) to 127.0.0.1, and
    return what comes back until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1") + first)
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = s.recv(65536)
            except ConnectionResetError:  # the body we sent was left unread: RST after the answer
                break
            if not data:
                break
            answer += data
        return answer


def test_unauthenticated_uploads_get_401_before_their_body_and_memory_stays_bounded(
    tmp_path: Path,
) -> None:
    """Four concurrent 128 MiB uploads, unsigned, signed with another secret, stale, and signed
    by an older client (no digest header), each get 401 from their headers alone: the agent
    never reads their bodies (each client's generator is cut short) and its peak RSS grows far
    less than one body. A raw socket that sends the head and 64 KiB of a 128 MiB body gets the
    401 without sending the rest."""
    a = start_agent(tmp_path / "flood")
    try:
        path = f"/v1/models/{'ab' * 32}"
        signed = sign(a.secret, "PUT", path, b"not the body")
        cases = {
            "no headers": {},
            "wrong secret": sign(os.urandom(32), "PUT", path, b"x"),
            "stale": sign(a.secret, "PUT", path, b"x", timestamp=time.time() - 600),
            "older client": {k: v for k, v in signed.items() if k != CONTENT_SHA256_HEADER},
        }
        expected = {
            "no headers": "missing",
            "wrong secret": "bad signature",
            "stale": "clock",
            "older client": "upgrade autoslim on the search host",
        }
        answers: dict[str, httpx.Response | BaseException] = {}
        sent: dict[str, int] = {}
        chunk = b"\0" * BIG_CHUNK

        def upload(name: str, headers: dict[str, str]) -> None:
            sent[name] = 0

            def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by
                for _ in range(BIG_CHUNKS):
                    sent[name] += 1
                    yield chunk

            try:
                answers[name] = httpx.put(a.url + path, content=body(), headers=headers, timeout=30)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                answers[name] = e

        with PeakRss(a.proc.pid) as rss:
            threads = [threading.Thread(target=upload, args=kv) for kv in cases.items()]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not any(t.is_alive() for t in threads)
            head = (
                f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{a.port}\r\n"
                f"Content-Length: {BIG_CHUNKS * BIG_CHUNK}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in cases["wrong secret"].items())
                + "\r\n"
            )
            raw = raw_request(a.port, head, chunk[:65536])
        for name, r in answers.items():
            assert isinstance(r, httpx.Response), (name, r)
            assert r.status_code == 401, (name, r.text)
            error = r.json()["error"]
            assert expected[name] in error and "\n" not in error, (name, error)
            assert r.headers.get("connection") == "close"
            assert sent[name] <= BIG_CHUNKS // 4, (name, sent[name])  # cut short, not read
        status_line, _, rest = raw.partition(b"\r\n")
        assert status_line == b"HTTP/1.1 401 Unauthorized", raw[:300]
        assert b"bad signature" in rest
        assert rss.growth < 64, (rss.start, rss.peak)  # 4 x 128 MiB were sent at it
        assert a.files() == []
        assert a.proc.poll() is None
        data = onnx_model(11)  # and it still serves signed requests
        assert a.request("PUT", f"/v1/models/{sha(data)}", data).status_code == 201
    finally:
        stop(a)


def test_a_body_that_is_not_the_signed_one_gets_401_and_stores_nothing(agent: Agent) -> None:
    """Valid headers, then a streamed body whose SHA-256 is not the signed one (changed, cut
    short, longer): 401 after the body, nothing stored, and the nonce is used up, so the same
    headers with the right body are a replay."""
    data = onnx_model(12)
    path = f"/v1/models/{sha(data)}"
    before = agent.files()
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0xFF

    def stream(body: bytes) -> Iterator[bytes]:
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    headers = sign(agent.secret, "PUT", path, data)
    for body in (bytes(changed), data[:-10], data + b"\0"):
        fresh = sign(agent.secret, "PUT", path, data)
        r = httpx.put(agent.url + path, content=stream(body), headers=fresh, timeout=30)
        assert r.status_code == 401, r.text
        error = r.json()["error"]
        assert f"not the signed {CONTENT_SHA256_HEADER} {sha(data)}" in error
        assert sha(body) in error and "\n" not in error
    r = httpx.put(agent.url + path, content=stream(bytes(changed)), headers=headers, timeout=30)
    assert r.status_code == 401 and "not the signed" in r.json()["error"]
    assert agent.files() == before
    r = httpx.put(agent.url + path, content=stream(data), headers=headers, timeout=30)
    assert r.status_code == 401 and "replayed" in r.json()["error"]
    assert agent.files() == before
    assert agent.request("PUT", path, data).status_code == 201
    assert (agent.store / f"{sha(data)}.onnx").read_bytes() == data


def test_requests_other_than_uploads_take_small_bodies_only(agent: Agent) -> None:
    """POST /v1/measure (a JSON request of ~200 bytes) and GET /v1/info take at most 64 KiB
    (413 after authentication, declared or streamed); an upload takes up to --max-upload-mb."""
    big = b" " * (65 * 1024)
    for method, path in [("POST", "/v1/measure"), ("GET", "/v1/info")]:
        r = agent.request(method, path, big)
        assert r.status_code == 413, (method, r.text)
        assert "JSON" in r.json()["error"] and str(64 * 1024) in r.json()["error"]
        headers = sign(agent.secret, method, path, big)
        streamed = httpx.request(
            method, agent.url + path, content=iter([big[:40000], big[40000:]]), headers=headers
        )
        assert streamed.status_code == 413, streamed.text
        assert agent.request(method, path, big, headers={}).status_code == 401  # auth first
    assert agent.request("GET", "/v1/info").status_code == 200


# -- uploads ----------------------------------------------------------------------------------


def test_upload_over_the_cap_gets_413_and_stores_nothing(tiny_agent: Agent, tmp_path: Path) -> None:
    big = onnx_model(3, channels=256)  # ~28 KB
    assert len(big) > 10485
    path = f"/v1/models/{sha(big)}"
    r = tiny_agent.request("PUT", path, big)
    assert r.status_code == 413 and "--max-upload-mb" in r.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while streaming
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    headers = sign(tiny_agent.secret, "PUT", path, big)
    r = httpx.put(tiny_agent.url + path, content=chunks(), headers=headers, timeout=30)
    assert r.status_code == 413
    assert tiny_agent.files() == []
    # the remote backend says so before uploading
    file = tmp_path / "big.onnx"
    file.write_bytes(big)
    with pytest.raises(AgentError, match="upload cap") as e:
        tiny_agent.backend().measure(file, input_shape=(3, 32, 32), runs=5, warmup=1)
    assert "\n" not in str(e.value)
    small = onnx_model(3, channels=4)
    assert tiny_agent.request("PUT", f"/v1/models/{sha(small)}", small).status_code == 201


def test_bad_uploads_get_400_or_422(agent: Agent) -> None:
    data = onnx_model(4)
    before = agent.files()
    r = agent.request("PUT", f"/v1/models/{sha(data + b'x')}", data)
    assert r.status_code == 400 and "sha256" in r.json()["error"]
    r = agent.request("PUT", "/v1/models/not-a-sha", data)
    assert r.status_code == 400 and "64 hex" in r.json()["error"]
    garbage = b"this is not an onnx file" * 10
    r = agent.request("PUT", f"/v1/models/{sha(garbage)}", garbage)
    assert r.status_code == 422 and "onnxruntime" in r.json()["error"]
    assert "Traceback" not in r.text and "\n" not in r.json()["error"]
    assert agent.files() == before
    path = f"/v1/models/{sha(data)}"
    assert agent.request("PUT", path, data).status_code == 201
    assert agent.request("PUT", path, data).status_code == 200
    assert (agent.store / f"{sha(data)}.onnx").read_bytes() == data


# -- measure requests -------------------------------------------------------------------------


def test_bad_measure_requests_name_the_field(agent: Agent) -> None:
    data = onnx_model(5)
    assert agent.request("PUT", f"/v1/models/{sha(data)}", data).status_code == 201
    good = {"sha256": sha(data), "input_shape": [3, 32, 32], "runs": 5, "warmup": 1}

    def post(body: object) -> httpx.Response:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return agent.request("POST", "/v1/measure", raw)

    r = post(b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    for field, value in [
        ("input_shape", "3x32x32"),
        ("input_shape", [3, 0, 32]),
        ("input_shape", [1, 1, 1, 1, 1]),
        ("runs", 0),
        ("runs", 100_001),
        ("runs", True),
        ("warmup", -1),
        ("threads", 0),
        ("provider", "NopeExecutionProvider"),
        ("sha256", "abc"),
    ]:
        r = post({**good, field: value})
        assert r.status_code == 400, (field, value, r.text)
        assert repr(field) in r.json()["error"], r.json()
    r = post({**good, "sha256": "0" * 64})
    assert r.status_code == 404 and "PUT /v1/models/" in r.json()["error"]
    r = post({**good, "input_shape": [1, 32, 32]})  # the model wants 3 channels
    assert r.status_code == 422 and "Traceback" not in r.text
    r = post(good)
    assert r.status_code == 200 and r.json()["runs"] == 5


def test_one_measurement_at_a_time(agent: Agent) -> None:
    data = onnx_model(6)
    assert agent.request("PUT", f"/v1/models/{sha(data)}", data).status_code == 201
    body = {"sha256": sha(data), "input_shape": [3, 32, 32], "runs": 20, "warmup": 1}
    r = agent.request("POST", "/v1/measure", json.dumps(body).encode())
    per_run = r.json()["median_ms"]
    body["warmup"] = min(100_000, int(2500 / per_run))  # about 2.5 s of warm-up
    first: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: first.append(agent.request("POST", "/v1/measure", json.dumps(body).encode()))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not agent.request("GET", "/v1/info").json()["busy"]:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        second = agent.request("POST", "/v1/measure", json.dumps(body).encode())
        assert second.status_code == 409
        assert second.json()["retry"] is True and second.json()["error"].startswith("busy:")
    finally:
        thread.join(60)
    assert first[0].status_code == 200, first[0].text


def test_remote_backend_waits_while_busy(agent: Agent, tmp_path: Path) -> None:
    data = onnx_model(7)
    (tmp_path / "m.onnx").write_bytes(data)
    assert agent.request("PUT", f"/v1/models/{sha(data)}", data).status_code == 201
    body = {"sha256": sha(data), "input_shape": [3, 32, 32], "runs": 20, "warmup": 1}
    per_run = agent.request("POST", "/v1/measure", json.dumps(body).encode()).json()["median_ms"]
    body["warmup"] = min(100_000, int(1500 / per_run))
    thread = threading.Thread(
        target=agent.request, args=("POST", "/v1/measure", json.dumps(body).encode())
    )
    thread.start()
    try:
        while not agent.request("GET", "/v1/info").json()["busy"]:
            time.sleep(0.02)
        lat = agent.backend().measure(tmp_path / "m.onnx", input_shape=(3, 32, 32), runs=20)
        assert lat.runs > 0
    finally:
        thread.join(60)


def test_an_agent_killed_mid_measurement_is_one_line_and_a_restart_serves_again(
    tmp_path: Path,
) -> None:
    """kill -9 of the agent while it times a model: the host gets one line naming the agent
    (a failed trial in a search, see the runner), and an agent restarted on the same store
    measures the stored model again."""
    a = start_agent(tmp_path / "killed")
    try:
        data = onnx_model(9)
        (tmp_path / "m.onnx").write_bytes(data)
        backend = a.backend()
        first = backend.measure(tmp_path / "m.onnx", input_shape=(3, 32, 32), runs=20)
        errors: list[BaseException] = []

        def measure() -> None:
            try:  # warm-up alone lasts >= 0.5 s: the kill lands mid-measurement
                backend.measure(tmp_path / "m.onnx", input_shape=(3, 32, 32), runs=2000)
            except BaseException as e:  # noqa: BLE001 - handed to the test thread
                errors.append(e)

        thread = threading.Thread(target=measure)
        thread.start()
        while not a.request("GET", "/v1/info").json()["busy"]:
            time.sleep(0.01)
        a.proc.send_signal(signal.SIGKILL)
        thread.join(60)
        assert len(errors) == 1 and isinstance(errors[0], AgentError), errors
        msg = str(errors[0])
        assert "\n" not in msg and f"127.0.0.1:{a.port}" in msg and "POST /v1/measure" in msg
    finally:
        stop(a)
    args = ["--port", "0", "--secret", str(a.secret_file), "--store", str(a.store)]
    code = f"from autoslim.agent.server import main; raise SystemExit(main({args!r}))"
    with open(a.log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=err, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while "listening on http://" not in a.log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, a.log.read_text()
            time.sleep(0.05)
        port = int(a.log.read_text().split("listening on http://127.0.0.1:")[1].split(",")[0])
        again = RemoteBackend("127.0.0.1", port, secret=a.secret)
        lat = again.measure(tmp_path / "m.onnx", input_shape=(3, 32, 32), runs=20)
        assert lat.runs > 0 and first.runs > 0
    finally:
        proc.terminate()
        proc.wait(10)


# -- errors a user sees -----------------------------------------------------------------------


def test_nothing_listening_is_one_line_saying_how_to_start_the_agent(tmp_path: Path) -> None:
    port = free_port()
    backend = RemoteBackend("127.0.0.1", port, secret=os.urandom(32), timeout=5)
    assert not backend.available()
    (tmp_path / "m.onnx").write_bytes(onnx_model(8))
    with pytest.raises(AgentError) as e:
        backend.measure(tmp_path / "m.onnx", input_shape=(3, 32, 32))
    msg = str(e.value)
    assert "\n" not in msg and f"autoslim agent --port {port}" in msg
    assert f"ssh -L {port}:127.0.0.1:{port}" in msg and f"127.0.0.1:{port}" in msg
    assert isinstance(e.value, AutoslimError) and e.value.exit_code == 1


def test_wrong_secret_through_the_backend_is_one_line(agent: Agent) -> None:
    backend = RemoteBackend("127.0.0.1", agent.port, secret=os.urandom(32))
    with pytest.raises(AgentError, match="HTTP 401") as e:
        backend.info()
    assert "\n" not in str(e.value) and "AUTOSLIM_AGENT_SECRET" in str(e.value)


def test_secret_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "dir" / "agent.secret"
    create_secret(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(load_secret(path)) == 32
    with pytest.raises(UsageError, match="already exists"):
        create_secret(path)
    path.chmod(0o644)
    with pytest.raises(UsageError, match=rf"chmod 600 {path}") as e:
        load_secret(path)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("AUTOSLIM_AGENT_SECRET", str(path))
    with pytest.raises(UsageError, match="chmod 600"):
        RemoteBackend.from_name("remote:127.0.0.1:8765")
    with pytest.raises(UsageError, match="--init-secret"):
        load_secret(tmp_path / "missing.secret")
    short = tmp_path / "short.secret"
    short.write_text("ab" * 8)
    short.chmod(0o600)
    with pytest.raises(UsageError, match="at least 32"):
        load_secret(short)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autoslim.agent.server import main

    path = tmp_path / "new.secret"
    assert main(["--init-secret", str(path)]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert main(["--init-secret", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("autoslim agent: error: ") and err.count("\n") == 1
    code = main(["--secret", str(tmp_path / "missing"), "--store", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and "autoslim agent --init-secret" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("::ffff:127.0.0.1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("192.168.1.5", False),
        ("10.0.0.1", False),
        ("device.example", False),
        ("localhost.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    from autoslim.agent.server import is_loopback

    assert is_loopback(host) is loopback


def test_a_host_other_than_loopback_needs_allow_remote(tmp_path: Path) -> None:
    """`autoslim agent --host 0.0.0.0` without --allow-remote: exit 2 and one line on stderr
    saying what was expected, what it got and how to fix it, before it reads its secret,
    makes its store or binds a port."""
    create_secret(tmp_path / "agent.secret")
    store = tmp_path / "models"
    with socket.socket() as held:  # were the agent to bind, this port would fail it otherwise
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        cmd = [sys.executable, "-m", "autoslim.cli", "agent", "--host", "0.0.0.0"]
        cmd += ["--port", str(port), "--secret", str(tmp_path / "agent.secret")]
        run = subprocess.run(
            [*cmd, "--store", str(store)], capture_output=True, text=True, cwd=REPO, timeout=60
        )
    assert run.returncode == 2, run.stderr
    assert run.stdout == "" and run.stderr.count("\n") == 1, run.stderr
    err = run.stderr
    assert err.startswith("autoslim agent: error: --host '0.0.0.0' is not a loopback address")
    for part in ("expected 127.0.0.1", f"ssh -L {port}:127.0.0.1:{port}", "--allow-remote"):
        assert part in err, err
    assert "listening" not in err and not store.exists()


def test_allow_remote_passes_the_host_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from autoslim.agent.server import main

    missing = ["--secret", str(tmp_path / "missing"), "--store", str(tmp_path / "s")]
    for host in ("::", "192.168.1.5", "device.example"):
        assert main(["--host", host, *missing]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--allow-remote" in err and f"'{host}'" in err
    # opted in: the host check passes (here the missing secret stops it, before binding)
    assert main(["--host", "0.0.0.0", "--allow-remote", *missing]) == 2
    err = capsys.readouterr().err
    assert "--init-secret" in err and "--allow-remote" not in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_ctrl_c_exits_130_quietly(tmp_path: Path) -> None:
    a = start_agent(tmp_path)
    a.proc.send_signal(signal.SIGINT)
    assert a.proc.wait(15) == 130
    log = a.log.read_text()
    assert "Traceback" not in log and log.count("\n") == 1, log


def test_a_search_measures_its_trials_on_the_agent(
    agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--backend remote:HOST:PORT`: the study runs unchanged, every latency (teacher and
    trials) comes from the agent, the files it measured are the trials' own (stored by their
    SHA-256), and the agent's identity is part of the study fingerprint."""
    from conftest import tiny_study_file

    from autoslim.study.spec import load_study_spec
    from autoslim.workflow import search

    monkeypatch.setenv("AUTOSLIM_AGENT_SECRET", str(agent.secret_file))
    before = set(agent.files())
    spec = load_study_spec(
        tiny_study_file(tmp_path, "remote", trials=2), backend=f"remote:127.0.0.1:{agent.port}"
    )
    res = search(spec, progress=False)
    ok = res.frame[res.frame["status"] == "ok"]
    assert len(ok) >= 1, res.frame[["trial", "status", "fail_reason"]].to_string()
    stored = set(agent.files()) - before
    for sha256 in ok["artifact_sha256"]:
        assert f"{sha256}.onnx" in stored  # the agent timed the trial's exported file
    fp = res.study.user_attrs["fingerprint"]
    assert fp["backend"] == f"remote:127.0.0.1:{agent.port}"
    assert json.loads(fp["device"])["cores"] >= 1
    assert (ok["teacher_latency_ms"] > 0).all() and (ok["latency_ms"] > 0).all()
