"""The demo end to end: cached build (data build, train, export router + edge) from the session's tiny
models, a loopback cloud server, the prompt table (`routet2i dev demo`, `make demo`) and
`edge-generate --demo --json` (a thin launcher: the demo runs in a subprocess on the training side)."""

from __future__ import annotations

import json
import subprocess
import sys

from routet2i.cli import main as edge_generate
from routet2i.training.cli import main as routet2i_main
from routet2i.training.demo import NOISE_NOTE


def test_demo_builds_once_routes_and_reports(tiny_models, tmp_path, capfd, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(tiny_models["edge-sd21"].parent)  # reuse the session's tiny models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red fox in the snow\nthree astronauts playing chess on the moon\n")
    out = tmp_path / "images"
    assert (
        routet2i_main(
            [
                "dev",
                "demo",
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--cache-dir",
                str(cache),
                "--steps",
                "2",
            ]
        )
        == 0
    )
    text = capfd.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["prompt", "PRS^", "alpha", "paced", "route", "reason", "seconds"]
    rows = [ln for ln in lines if ln.startswith(("a red fox", "three astronauts"))]
    assert len(rows) == 2
    for row in rows:
        prs, alpha, paced, route, reason, seconds = row.split()[-6:]
        assert float(paced) == 0.5  # the demo's target; its quota of 1000 is far from running out
        assert 0.0 <= float(prs) <= 1.0 and 0.0 <= float(alpha) <= 0.5
        gap = float(prs) - float(alpha)  # printed with 4 decimals: decide only away from the tie
        if abs(gap) > 1e-4:
            assert route == ("cloud" if gap < 0 else "edge")
        assert reason == "router" and float(seconds) > 0
    assert NOISE_NOTE in text and "generated in the cloud" in text
    assert len(list(out.glob("*.png"))) == 2
    built = {p.name for p in cache.iterdir()}
    assert {"quality.csv", "router-ckpt", "bundles", "ready.json"} <= built
    stamp = (cache / "ready.json").stat().st_mtime

    monkeypatch.setenv("ROUTET2I_DEMO_CACHE", str(cache))
    png = tmp_path / "fox.png"
    assert (
        edge_generate(["a red fox", "--demo", "--json", "--force", "cloud", "-o", str(png), "--no-progress"])
        == 0
    )
    result = json.loads(capfd.readouterr().out)  # printed by the demo's subprocess
    assert (result["route"], result["reason"], result["output"]) == ("cloud", "forced", str(png))
    assert result["quota"]["used"] == 1 and png.is_file()
    assert (cache / "ready.json").stat().st_mtime == stamp  # cached: not rebuilt


def test_edge_generate_demo_without_the_workstation_side_names_the_extra(tmp_path):
    """A device install (no routet2i.training, no torch): `--demo` says which extra it needs, exit 2."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch' or name.startswith('routet2i.training'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from routet2i.cli import main\n"
        "sys.exit(main(['a fox', '--demo', '-o', sys.argv[1]]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "x.png")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "routet2i[all]" in err and "Traceback" not in err
