"""The demo end to end: cached build (data build, train, export router + edge) from the session's tiny
models, a loopback cloud server, the prompt table (`make demo`) and `edge-generate --demo --json`."""

from __future__ import annotations

import json

from routet2i.cli import main as edge_generate
from routet2i.demo import NOISE_NOTE
from routet2i.demo import main as demo_main


def test_demo_builds_once_routes_and_reports(tiny_models, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(tiny_models["edge-sd21"].parent)  # reuse the session's tiny models
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red fox in the snow\nthree astronauts playing chess on the moon\n")
    out = tmp_path / "images"
    assert (
        demo_main(["--prompts", str(prompts), "--out", str(out), "--cache-dir", str(cache), "--steps", "2"])
        == 0
    )
    text = capsys.readouterr().out
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
    result = json.loads(capsys.readouterr().out)
    assert (result["route"], result["reason"], result["output"]) == ("cloud", "forced", str(png))
    assert result["quota"]["used"] == 1 and png.is_file()
    assert (cache / "ready.json").stat().st_mtime == stamp  # cached: not rebuilt
