"""Install on a device as a user would: the wheel (`make wheel` -> dist/*.whl) with only the `edge` extra in
a fresh virtual environment (no torch), then `edge-generate` on a tiny edge bundle.

Slow (marked): the fresh venv installs onnxruntime, grpcio, tokenizers, pillow, ... from the package index
(about 1-2 minutes with a warm pip cache; it needs the index or a pip cache that holds them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)


def test_wheel_with_only_edge_extra_runs_edge_generate(tiny_models, tmp_path):
    from _device_bundles import edge_bundle_for

    bundle = edge_bundle_for(tiny_models["edge-sd21"])
    dist = tmp_path / "dist"
    proc = _run(["make", "-s", "wheel", f"DIST={dist}", f"PY={sys.executable}"], cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = dist.glob("routet2i-*.whl")
    import zipfile

    device_files = {n for n in zipfile.ZipFile(whl).namelist() if n.count("/") == 1 and n.endswith(".py")}
    # the device package holds exactly sdk/'s modules (no stale copy of a moved file from build/)
    assert device_files == {f"routet2i/{p.name}" for p in (REPO / "sdk").glob("*.py")}

    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    py = venv / "bin" / "python"
    proc = _run([str(py), "-m", "pip", "install", "-q", f"{whl}[edge]"])
    if proc.returncode != 0 and ("No matching distribution" in proc.stderr or "Could not" in proc.stderr):
        pytest.skip(
            f"the package index is not reachable for the edge extra's dependencies: {proc.stderr[-300:]}"
        )
    assert proc.returncode == 0, proc.stderr

    # only the edge extra: no torch, no transformers, no diffusers in this environment
    freeze = _run([str(py), "-m", "pip", "freeze"]).stdout.lower()
    for heavy in ("torch", "transformers", "diffusers", "optimum"):
        assert not any(line.startswith(heavy + "=") for line in freeze.splitlines()), heavy
    assert "onnxruntime" in freeze

    cfg = tmp_path / "routet2i.toml"
    cfg.write_text(f'edge = "{bundle}"\n\n[log]\ndecision_log = ""\nstate_file = ""\n')
    out = tmp_path / "fox.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROUTET2I_")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    proc = _run(
        [str(venv / "bin" / "edge-generate"), "a red fox in the snow", "--config", str(cfg), "--force", "edge",
         "--steps", "2", "--seed", "0", "-o", str(out), "--json", "--no-progress"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["route"], result["reason"], result["seed"]) == ("edge", "forced", 0)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --demo on a device install: one line naming the extra it needs, exit 2
    proc = _run([str(venv / "bin" / "edge-generate"), "a fox", "--demo"], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "routet2i[all]" in proc.stderr and "Traceback" not in proc.stderr
