"""The study report: the data step on its own, then the HTML in real headless Chromium."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import autoslim
from autoslim.cli import main
from autoslim.report.data import layer_knobs, report_data
from autoslim.report.html import render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and os.environ.get("AUTOSLIM_REQUIRE_BROWSER"):
    raise RuntimeError(
        "make test installs Debian's chromium; it is missing: apt-get install chromium"
    )


@pytest.fixture(scope="module")
def view(tiny_study):
    return autoslim.load_study(tiny_study.run_dir, importance=True)


def test_report_data_is_plain_and_matches_the_trials(view) -> None:
    data = report_data(view)
    json.dumps(data)  # plain data: serialisable as is
    df = view.trials
    assert [r["trial"] for r in data["table"]] == df["trial"].tolist()
    for _, r in df.iterrows():
        d = data["details"][str(int(r.trial))]
        assert d["status"] == r.status
        if r.status == "ok":
            assert d["val_accuracy"] == pytest.approx(r.val_accuracy)
            assert d["export_command"] == view.export_command(int(r.trial))
            assert d["config"] == json.loads(r.config)
        else:
            assert "export_command" not in d
    assert data["front_knobs"]["trials"] == df[df.front]["trial"].tolist()
    hv = [v for _, v in data["hv_history"]]
    assert len(hv) == len(df) and hv[-1] > 0 and all(np.diff(hv) >= 0)  # never decreases
    assert len(data["params"]) == int((df.status == "ok").sum())
    assert set(data["importances"]) == {"accuracy", "latency"}


def test_accuracy_floor_is_drawn_where_the_study_sets_one(view, tmp_path) -> None:
    assert report_data(view)["accuracy_floor"] is None  # the tiny study sets none
    floored = dataclasses.replace(view, spec={**view.spec, "max_accuracy_drop": 0.05})
    data = report_data(floored)
    assert data["accuracy_floor"] == pytest.approx(view.baseline["val_accuracy"] - 0.05)
    html = render_html(data, floored.trials, tmp_path / "r.html").read_text()
    assert f"accuracy floor {data['accuracy_floor']:.4f} (val)" in html


def test_the_report_names_the_study_metric(view, tmp_path) -> None:
    """A segmentation study's report says mIoU where a classification one says accuracy."""
    floored = {**view.spec, "max_accuracy_drop": 0.05}
    seg = dataclasses.replace(
        view,
        spec=floored,
        task_record={"name": "segmentation", "metric": "miou", "label": "mIoU"},
    )
    data = report_data(seg)
    assert data["task"]["label"] == "mIoU"
    assert all("val_miou" in r and "val_accuracy" not in r for r in data["table"])
    assert all("test_miou" in d for d in data["details"].values())
    html = render_html(data, seg.trials, tmp_path / "seg.html").read_text()
    assert "validation mIoU (artifact)" in html and "<th>val_miou</th>" in html
    assert f"mIoU floor {data['accuracy_floor']:.4f} (val)" in html
    assert "accuracy floor" not in html and "val mIoU" in html
    cls = dataclasses.replace(view, spec=floored)
    html = render_html(report_data(cls), cls.trials, tmp_path / "cls.html").read_text()
    assert "validation accuracy (artifact)" in html and "<th>val_accuracy</th>" in html
    assert "mIoU" not in html


def test_layer_knobs_fill_unnamed_layers_with_the_default() -> None:
    import pandas as pd

    cfg_a = {"prune": {"conv1": 0.5}, "layers": {"conv2": {"weight_bits": 8, "act_bits": 8,
             "rank_ratio": None}}, "default": {"weight_bits": 32, "act_bits": 32, "rank_ratio": None}}  # fmt: skip
    cfg_b = {"prune": {"conv1": 0.25, "layer2.0.conv1": 0.1}, "layers": {"fc": {"weight_bits": 4,
             "act_bits": 8, "rank_ratio": 0.5}}, "default": {"weight_bits": 32, "act_bits": 32}}  # fmt: skip
    df = pd.DataFrame({"trial": [3, 7], "config": [json.dumps(cfg_a), json.dumps(cfg_b)]})
    k = layer_knobs(df)
    assert k["trials"] == [3, 7]
    assert k["prune"]["columns"] == ["conv1", "layer2.0.conv1"]
    assert k["prune"]["values"] == [[0.5, 0.0], [0.25, 0.1]]
    assert k["weight_bits"]["columns"] == ["conv2", "fc"]
    assert k["weight_bits"]["values"] == [[8, 32], [32, 4]]
    assert k["rank"]["values"] == [[1.0, 1.0], [1.0, 0.5]]  # 1.0 = low-rank off


def test_report_formats_for_terminals_and_scripts(tiny_study, capsys) -> None:
    run = str(tiny_study.run_dir)
    assert main(["report", run, "--format", "json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert len(recs) == len(tiny_study.result.frame)
    assert main(["report", run, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("trial,") and len(lines) == len(recs) + 1
    assert main(["report", run, "--format", "table"]) == 0
    assert "val_acc" in capsys.readouterr().out
    assert main(["report", str(Path(run) / "missing")]) == 2
    assert main(["report", run]) == 0  # html: the study folder's report and tables, refreshed
    out = capsys.readouterr().out
    assert f"{run}/report.html" in out and f"{run}/trials.parquet" in out


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is installed by `make test`")
def test_report_opens_in_headless_chromium(view, tmp_path) -> None:
    from playwright.sync_api import sync_playwright

    path = render_html(report_data(view), view.trials, tmp_path / "report.html")
    df = view.trials
    measured = df[df.status == "ok"]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(path.as_uri())
        for div in ("scatter", "heatmap", "hypervolume", "parcoords", "importance"):
            page.wait_for_selector(f"#{div} .main-svg", timeout=30_000)
        # every measured trial is drawn twice (size and latency panels), plus the teacher twice
        points = page.locator("#scatter .scatterlayer .point")
        assert points.count() == 2 * len(measured) + 2
        # hover shows the trial's metrics
        traces = page.evaluate(
            "Array.from(document.getElementById('scatter').data).map(t => t.name)"
        )
        i = traces.index("front")
        # plotly hit-tests mouse positions on its drag layer: move the real mouse onto the point
        box = page.locator("#scatter .scatterlayer .trace").nth(i).locator(".point").first
        box.scroll_into_view_if_needed()
        b = box.bounding_box()
        x, y = b["x"] + b["width"] / 2, b["y"] + b["height"] / 2
        page.mouse.move(x, y)
        page.wait_for_selector("#scatter .hoverlayer .hovertext", timeout=10_000)
        hover = page.locator("#scatter .hoverlayer .hovertext").first.text_content()
        # points may overlap: plotly shows the nearest; its text must be that trial's numbers
        shown = int(re.match(r"trial (\d+)", hover).group(1))
        row = df[df.trial == shown].iloc[0]
        assert f"val {row.val_accuracy:.4f} test {row.test_accuracy:.4f}" in hover
        assert f"{row.size_bytes / 1e6:.3f} MB, {row.latency_ms:.3f} ms" in hover
        # click: the full config and the exact export command of that trial
        page.mouse.click(x, y)
        page.wait_for_function(
            "document.getElementById('export-cmd').textContent.startsWith('autoslim')"
        )
        assert page.inner_text("#export-cmd") == view.export_command(shown)
        details = json.loads(page.inner_text("#details"))
        assert details["trial"] == shown
        assert details["config"] == json.loads(row.config)
        # the table sorts by a clicked header
        page.click("#trials th:has-text('val_accuracy')")
        first = int(page.locator("#trials tbody tr").first.get_attribute("data-trial"))
        ok = measured.sort_values("val_accuracy", kind="stable")
        assert first == int(ok.iloc[0].trial)
        shot = tmp_path / "shot.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 50_000


def test_static_images_with_kaleido(view, tmp_path) -> None:
    pytest.importorskip("kaleido", reason="optional: pip install 'autoslim[images]'")
    if CHROMIUM is None:
        pytest.skip("kaleido drives the system's chromium")
    from autoslim.report.html import write_images

    paths = write_images(report_data(view), view.trials, tmp_path / "img")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG" and b"<svg" in paths[1].read_bytes()[:2000]


def test_optuna_dashboard_opens_the_study_and_its_artifacts(tiny_study, tmp_path) -> None:
    """The README's `optuna-dashboard STORAGE --artifact-dir STORE` serves the study: its
    trials with autoslim's metric names, and a trial's ONNX file byte for byte."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    dash = Path(sys.executable).with_name("optuna-dashboard")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    storage = f"sqlite:///{tiny_study.run_dir / 'study.db'}"
    args = [str(dash), storage, "--port", str(port), "--quiet"]
    p = subprocess.Popen([*args, "--artifact-dir", str(tiny_study.run_dir / "artifacts")])
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = httpx.get(f"{base}/api/studies", timeout=5).json()["study_summaries"]
                break
            except httpx.TransportError:
                assert p.poll() is None and time.monotonic() < deadline, "dashboard did not start"
                time.sleep(0.3)
        (st,) = [s for s in studies if s["study_name"] == "tiny"]
        detail = httpx.get(f"{base}/api/studies/{st['study_id']}", timeout=30).json()
        assert len(detail["trials"]) == len(tiny_study.result.frame)
        assert detail["objective_names"] == tiny_study.spec.objectives
        row = tiny_study.result.frame.query("status == 'ok'").iloc[0]
        (trial,) = [t for t in detail["trials"] if t["number"] == int(row.trial)]
        got = httpx.get(
            f"{base}/artifacts/{st['study_id']}/{trial['trial_id']}/{row.artifact_id}", timeout=30
        )
        assert got.status_code == 200
        assert got.content == (tiny_study.run_dir / "artifacts" / row.artifact_id).read_bytes()
    finally:
        p.terminate()
        p.wait(timeout=30)
