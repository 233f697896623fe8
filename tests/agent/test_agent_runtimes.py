"""A real agent process times on every runtime it has: it lists them in /v1/info, stores ONNX
files and .pte programs by content, measures each on the runtime a request names, and refuses a
runtime it lacks or an artifact of the wrong kind in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_agent import Agent, sha, start_agent, stop

from autoslim import UsageError
from autoslim.measure import Latency, get_backend
from autoslim.measure.backends import available_runtimes
from autoslim.pipeline import export_float


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("agent-runtimes"))
    yield a
    stop(a)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_teacher, fmnist) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("agent-artifacts")
    example = torch.zeros(1, *fmnist.input_shape)
    out = {"onnx": export_float(tiny_teacher.model, base / "m.onnx", example=example).path}
    if "executorch-xnnpack" in available_runtimes():
        out["pte"] = export_float(
            tiny_teacher.model, base / "m.pte", example=example, kind="pte"
        ).path
    return out


def test_info_lists_the_runtimes_with_their_versions(agent: Agent) -> None:
    info = agent.request("GET", "/v1/info").json()
    assert info["runtimes"] == available_runtimes()  # the same machine: the same runtimes
    assert info["runtimes"]["onnxruntime-cpu"].startswith("onnxruntime ")


@pytest.mark.parametrize("runtime", ["onnxruntime-cpu", "openvino-cpu", "executorch-xnnpack"])
def test_the_remote_backend_measures_on_the_runtime_it_names(
    runtime: str, agent: Agent, artifacts, fmnist
) -> None:
    if runtime not in available_runtimes():
        pytest.skip(f"{runtime} is not installed here")
    name = f"remote:127.0.0.1:{agent.port}/{runtime}"
    backend = get_backend(name, secret_file=agent.secret_file)
    assert backend.kind == ("pte" if runtime == "executorch-xnnpack" else "onnx")
    assert backend.name == (name if runtime != "onnxruntime-cpu" else name.rpartition("/")[0])
    assert backend.version() == available_runtimes()[runtime]
    lat = backend.measure(
        artifacts[backend.kind], input_shape=fmnist.input_shape, runs=20, warmup=2
    )
    assert isinstance(lat, Latency) and 0 < lat.median_ms <= lat.p90_ms
    assert lat.device["runtime"] == available_runtimes()[runtime]
    if runtime != "onnxruntime-cpu":
        assert lat.device["backend"] == runtime  # timed by that runtime on the agent


def test_a_runtime_the_agent_lacks_or_an_unknown_one_is_one_line(agent: Agent) -> None:
    with pytest.raises(UsageError, match="unknown runtime 'tensorrt'") as e:
        get_backend(f"remote:127.0.0.1:{agent.port}/tensorrt", secret_file=agent.secret_file)
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    body = json.dumps({"sha256": "0" * 64, "input_shape": [1, 28, 28], "runtime": "tensorrt"})
    r = agent.request("POST", "/v1/measure", body.encode())
    assert r.status_code == 400 and "bad field 'runtime'" in r.json()["error"]


def test_a_program_measured_as_onnx_is_refused_naming_the_kinds(agent: Agent, artifacts) -> None:
    if "pte" not in artifacts:
        pytest.skip("executorch is not installed here")
    data = artifacts["pte"].read_bytes()
    put = agent.request("PUT", f"/v1/models/{sha(data)}", data)
    assert put.status_code in (200, 201)
    assert f"{sha(data)}.pte" in agent.files()
    body = json.dumps({"sha256": sha(data), "input_shape": [1, 28, 28]}).encode()
    r = agent.request("POST", "/v1/measure", body)
    assert r.status_code == 422
    assert "is a .pte program, but runtime onnxruntime-cpu runs ONNX files" in r.json()["error"]


def test_a_corrupt_program_upload_is_refused_and_not_stored(agent: Agent, artifacts) -> None:
    if "pte" not in artifacts:
        pytest.skip("executorch is not installed here")
    data = artifacts["pte"].read_bytes()[:200]  # a program's header, cut short
    before = agent.files()
    r = agent.request("PUT", f"/v1/models/{sha(data)}", data)
    assert r.status_code == 422 and "executorch cannot load the uploaded model" in r.json()["error"]
    assert agent.files() == before
