"""A hub id that cannot be reached says so in one line and suggests a local folder (exit 2), for
`export edge --pipeline`, `train --backbone` and `data build --edge-pipeline/--cloud-pipeline`, before any
library retries. The hub is a closed loopback port here; the Hugging Face cache an empty folder."""

from __future__ import annotations

import socket
import time

import pytest
from routet2i import UsageError
from routet2i.training.hub import check_hub_id


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY",
                "http_proxy"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path


def test_check_hub_id_rules(no_hub, monkeypatch):
    with pytest.raises(UsageError, match=r"--pipeline 'acme/sd': not a local folder, and the Hugging Face Hub "
                                         r"\(127\.0\.0\.1:\d+\) cannot be reached .*pass the folder: --pipeline DIR"):  # fmt: skip
        check_hub_id("acme/sd", "--pipeline")
    with pytest.raises(UsageError, match="no such folder"):
        check_hub_id("./models/sd21", "--pipeline")
    check_hub_id(str(no_hub), "--pipeline")  # a local folder: no probe
    (no_hub / "hf-cache" / "models--acme--sd" / "snapshots" / "abc").mkdir(parents=True)
    check_hub_id("acme/sd", "--pipeline")  # cached: the libraries use the cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        check_hub_id("acme/other", "--backbone")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    check_hub_id("acme/other", "--backbone")  # behind a proxy: left to the libraries


def _one_line_exit_2(argv, capsys, option):
    from routet2i.training.cli import main

    t0 = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{option} 'acme/" in err and "cannot be reached" in err and f"{option} DIR" in err, err
    assert time.perf_counter() - t0 < 30  # no minute of retries


def test_export_edge_pipeline(no_hub, capsys):
    _one_line_exit_2(["export", "edge", "--pipeline", "acme/sd21", "--out", str(no_hub / "b")], capsys,
                     "--pipeline")  # fmt: skip
    assert not (no_hub / "b").exists()


def test_train_backbone(no_hub, capsys):
    import pandas as pd

    rows = [("syn", f"p{i}", f"a cat number {i}", m, "m1", float(i % 3 + (m == "cloud")), 1)
            for i in range(6) for m in ("edge", "cloud")]  # fmt: skip
    table = no_hub / "t.csv"
    pd.DataFrame(rows, columns=["dataset", "prompt_id", "prompt", "model", "metric", "value", "n"]).to_csv(
        table, index=False
    )
    argv = ["train", "--table", str(table), "--dataset", "syn", "--edge-model", "edge", "--cloud-model", "cloud",
            "--out", str(no_hub / "r"), "--backbone", "acme/encoder", "--cache-dir", str(no_hub / "c")]  # fmt: skip
    _one_line_exit_2(argv, capsys, "--backbone")
    assert not (no_hub / "r").exists()


def test_data_build_pipelines(no_hub):
    from routet2i.training.data_build import _load_pipeline

    with pytest.raises(
        UsageError, match=r"--edge-pipeline 'acme/sd': .*cannot be reached.*--edge-pipeline DIR"
    ):
        _load_pipeline("acme/sd", "cpu", None, "--edge-pipeline")
