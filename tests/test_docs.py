"""Docs that run: what README.md and examples/*.md show a user to paste must work as written.

- Every ```toml block is loaded as a client config with `routet2i.config.load_config` (no block is exempt:
  a user pastes them into routet2i.toml), and so is examples/routet2i.toml.
- Every ```python block preceded by a ``<!-- runnable -->`` line runs, in a folder holding tiny
  ``bundles/router`` and ``bundles/edge``, with ``ROUTET2I_TOKEN`` set. The one substitution: the example
  cloud endpoint ``images.example.com:443`` becomes a closed loopback port, i.e. the cloud is down and the
  block must still produce its image on the edge. And the tiny edge bundle runs at 128x128 where a block
  says 512 (same code; the tiny UNet takes about a second per step at 512 px on a CPU).
- Every ```ini block (systemd units) keeps comments on their own lines: systemd has no trailing comments,
  ``Environment=A=1  # note`` sets A to "1  # note".
"""

from __future__ import annotations

import re
import shutil
import socket
from pathlib import Path

import pytest
from _device_bundles import edge_bundle_for, handmade_router_bundle
from routet2i.config import load_config

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "examples").glob("*.md"))]
RUNNABLE = "<!-- runnable -->"
EXAMPLE_ENDPOINT = "images.example.com:443"

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(lang: str) -> list[tuple[str, int, str, bool]]:
    """(file, line, text, runnable) of every ``` block of ``lang`` in the docs."""
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            if m.group(1) != lang:
                continue
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
            line = text.count("\n", 0, m.start()) + 1
            out.append((doc.relative_to(REPO).as_posix(), line, m.group(2), before == RUNNABLE))
    return out


def _id(block: tuple[str, int, str, bool]) -> str:
    return f"{block[0]}:{block[1]}"


TOML_BLOCKS = _blocks("toml")
PYTHON_RUNNABLE = [b for b in _blocks("python") if b[3]]
INI_BLOCKS = _blocks("ini")


def test_the_docs_have_blocks_to_check():
    files = {b[0] for b in TOML_BLOCKS}
    assert {"README.md", "examples/jetson.md", "examples/custom_model_pair.md"} <= files
    assert {b[0] for b in PYTHON_RUNNABLE} >= {"README.md"} and len(PYTHON_RUNNABLE) >= 2
    assert INI_BLOCKS, "examples/jetson.md's systemd excerpt"


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=_id)
def test_toml_block_loads_as_client_config(block, tmp_path):
    path = tmp_path / "routet2i.toml"
    path.write_text(block[2], encoding="utf-8")
    config = load_config(path, environ={})  # raises UsageError (bad TOML, unknown key, bad value)
    assert config.token is None


def test_sample_toml_file_loads_with_every_option_shown(tmp_path):
    c = load_config(REPO / "examples" / "routet2i.toml", environ={})
    assert c.check_hashes == "first" and c.trusted_keys is None and c.router and c.edge
    text = (REPO / "examples" / "routet2i.toml").read_text()
    readme_toml = "\n".join(b[2] for b in TOML_BLOCKS if b[0] == "README.md")
    for key in ("check_hashes", "trusted_keys"):  # the newer options are shown to users
        assert key in text and key in readme_toml, key
    # the commented-out trusted_keys line is itself a valid setting
    line = next(ln for ln in text.splitlines() if ln.lstrip("# ").startswith("trusted_keys"))
    (tmp_path / "t.toml").write_text(line.lstrip("# ").split("  #")[0] + "\n")
    assert load_config(tmp_path / "t.toml", environ={}).trusted_keys


@pytest.mark.parametrize("block", INI_BLOCKS, ids=_id)
def test_ini_blocks_have_no_trailing_comments(block):
    for ln in block[2].splitlines():
        if ln.strip() and not ln.lstrip().startswith(("#", ";", "[")):
            assert "#" not in ln.split("=", 1)[-1], f"{_id(block)}: systemd has no trailing comments: {ln!r}"


def test_jetson_systemd_unit_sets_what_the_service_needs():
    unit = next(b[2] for b in INI_BLOCKS if b[0] == "examples/jetson.md")
    keys = {ln.split("=", 1)[0] for ln in unit.splitlines() if "=" in ln and not ln.startswith("#")}
    assert {"User", "WorkingDirectory", "ExecStart", "Environment"} <= keys
    assert "ORT_TENSORRT_CACHE_PATH=" in unit and "ORT_TENSORRT_ENGINE_CACHE_ENABLE=1" in unit


def test_gpu_export_advice_agrees_everywhere():
    """CUDA EP: `--fp16 --optimize` (the fused graph, fastest in docs/GPU.md); TensorRT: `--fp16` only, since
    the CUDA-only fused ops of `--optimize-target gpu` are not TensorRT ops."""
    texts = {d.relative_to(REPO).as_posix(): d.read_text() for d in DOCS}
    for name, text in texts.items():
        for ln in text.splitlines():
            if "routet2i export edge" in ln and "--fp16" in ln and "--optimize" in ln:
                assert "tensorrt" not in ln.lower(), f"{name}: {ln}"
    jetson = texts["examples/jetson.md"]
    assert "--fp16 --optimize" in jetson and "--optimize-target gpu" in jetson
    assert "--fp16 --optimize" in texts["examples/custom_model_pair.md"]


@pytest.fixture(scope="module")
def doc_folder(tmp_path_factory, tiny_models) -> Path:
    """A working folder as the docs assume: bundles/router and bundles/edge."""
    root = tmp_path_factory.mktemp("docs-run")
    router, _ = handmade_router_bundle(tmp_path_factory.mktemp("router") / "bundle")
    shutil.copytree(router, root / "bundles" / "router")
    shutil.copytree(edge_bundle_for(tiny_models["edge-sd21"]), root / "bundles" / "edge")
    return root


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("block", PYTHON_RUNNABLE, ids=_id)
def test_runnable_python_block_runs(block, doc_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(doc_folder)
    monkeypatch.setenv("ROUTET2I_TOKEN", "rt2i_docs_test")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    code = block[2].replace(EXAMPLE_ENDPOINT, f"127.0.0.1:{_closed_port()}")
    code = re.sub(r"\b(width|height)=512\b", r"\1=128", code)
    for old in doc_folder.glob("*.png"):
        old.unlink()
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(code, _id(block), "exec"), namespace)  # noqa: S102 - the docs' own code
    images = [p for p in doc_folder.glob("*.png")] + [
        v for v in namespace.values() if type(v).__module__.startswith("PIL.")
    ]
    assert images, f"{_id(block)} made no image"
    for v in namespace.values():  # the client's sessions and threads go with the test
        if hasattr(v, "close") and type(v).__module__.startswith("routet2i"):
            v.close()


def test_router_never_shares_tensorrt_with_the_edge_pipeline(monkeypatch):
    """examples/jetson.md: `providers` with TensorRT first runs the router on the next provider listed."""
    import routet2i.ort as ort
    from routet2i.router_runtime import router_providers

    monkeypatch.delenv("ROUTET2I_PROVIDERS", raising=False)
    trt = ("TensorrtExecutionProvider", {"trt_fp16_enable": True})
    monkeypatch.setattr(
        ort,
        "available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert ort.resolve_providers(None)[0] == "TensorrtExecutionProvider"  # the edge pipeline keeps it
    assert router_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert router_providers([trt, "CUDAExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert router_providers(["tensorrt"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(
        ort, "available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    )
    assert router_providers(None) == ["CPUExecutionProvider"]
