"""The demo end to end: cached build (data build, train, export router + edge) from the session's tiny
models, a loopback cloud server, the prompt table (`routet2i dev demo`, `make demo`) and
`edge-generate --demo --json` (a thin launcher: the demo runs in a subprocess on the training side)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from routet2i.cli import main as edge_generate
from routet2i.training.demo import CLOUD_COSTS, EDGE_MODEL, NOISE_NOTE, TABLE

DEMO_PROMPTS = Path(__file__).resolve().parents[1] / "examples" / "demo_prompts.txt"


def test_shipped_genai_bench_table_is_small_attributed_and_three_models():
    """The one derived table in the repository: GenAI-Bench's 527 prompts for SD 2.1, SDXL base and DALL-E 3
    only (the demo's edge model and its two cloud tiers), with its attribution and the Apache-2.0 license
    beside it."""
    import csv

    rows = list(csv.DictReader(TABLE.open()))
    assert {r["model"] for r in rows} == {"SDXL_2_1", "SDXL_Base", "DALLE_3"} == {EDGE_MODEL, *CLOUD_COSTS}
    assert {r["dataset"] for r in rows} == {"genai_bench_527"}
    assert {r["metric"] for r in rows} == {"human_align_1to5_mean"}
    # every prompt for every model, but one rating outside the 1-5 scale in the source (NOTICE says which)
    assert len({r["prompt_id"] for r in rows}) == 527 and len(rows) == 3 * 527 - 1
    assert {(r["prompt_id"], r["model"]) for r in rows}.isdisjoint({("00232", "DALLE_3")})
    assert all(1.0 <= float(r["value"]) <= 5.0 for r in rows)
    notice = TABLE.with_name("genai_bench_demo_NOTICE.txt").read_text()
    assert "GenAI-Bench" in notice and "Apache License" in notice and "t2v_metrics" in notice
    assert all(name in notice for name in ("SDXL_2_1", "SDXL_Base", "DALLE_3"))
    assert "Apache License" in TABLE.with_name("genai_bench_LICENSE.txt").read_text()
    assert TABLE.stat().st_size < 250_000


def test_demo_builds_once_routes_and_reports(tiny_models, tmp_path, capfd, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(tiny_models["edge-sd21"].parent)  # reuse the session's tiny models
    prompts = tmp_path / "prompts.txt"
    demo_prompts = [ln for ln in DEMO_PROMPTS.read_text().splitlines() if ln and not ln.startswith("#")]
    prompts.write_text("# a comment\n" + "\n".join(demo_prompts) + "\n")
    out = tmp_path / "images"
    # as a user runs it: its own process (the quiet build redirects the process's stdout/stderr)
    proc = subprocess.run(
        [sys.executable, "-m", "routet2i.training.demo", "--prompts", str(prompts), "--out", str(out),
         "--cache-dir", str(cache), "--steps", "2"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    captured = proc
    text = captured.stdout
    # quiet: our progress lines only; torch/diffusers chatter went to the cache's build.log (-v shows it)
    assert "demo: building" in captured.stderr
    for noise in ("Warning", "Multiple distributions", "Loading pipeline components", "safety_checker"):
        assert noise not in captured.stderr, noise
    assert (cache / "build.log").stat().st_size > 0  # the build's own output, kept
    lines = text.splitlines()
    assert lines[0].split() == ["prompt", "PRS^", "budget", "model", "units", "route", "reason", "seconds"]
    rows = lines[2 : 2 + len(demo_prompts)]
    assert len(rows) == len(demo_prompts) == 8
    prs_values, chosen, spent = [], [], 0
    for row in rows:
        prs, budget, model, units, route, reason, seconds = row.split()[-7:]
        assert float(budget) == 1.0  # the demo's budget; its quota of 1000 units is far from running out
        assert 0.0 <= float(prs) <= 1.0
        prs_values.append(float(prs))
        chosen.append(model)
        # the route follows the model and the units are its cost (the quota line below: the server charged them)
        if route == "edge":
            assert model == EDGE_MODEL and int(units) == 0
        else:
            assert route == "cloud" and int(units) == CLOUD_COSTS[model]
        spent += int(units)
        assert reason == "router" and float(seconds) > 0
    # real routing: a router trained on GenAI-Bench ratings tells these prompts apart (the old demo's
    # router, trained on noise images, gave every prompt 0.4999-0.5003) and the prompts do not all land
    # on one model
    assert max(prs_values) - min(prs_values) > 0.03, prs_values
    assert len(set(chosen)) >= 2, chosen
    routing = json.loads((cache / "bundles" / "router" / "routing.json").read_text())
    assert (routing["edge_model"], routing["cloud_model"], routing["dataset"]) == (
        "SDXL_2_1",
        "SDXL_Base",
        "genai_bench_527",
    )
    assert routing["models"] == [
        {"name": "SDXL_2_1", "where": "edge", "cost": 0},
        {"name": "SDXL_Base", "where": "cloud", "cost": 1},
        {"name": "DALLE_3", "where": "cloud", "cost": 3},
    ]
    summary = lines[3 + len(demo_prompts)]
    n_edge = chosen.count(EDGE_MODEL)
    assert summary.startswith(f"{n_edge} on the edge ({EDGE_MODEL}), ")
    assert (
        f"{chosen.count('SDXL_Base')} SDXL_Base, {chosen.count('DALLE_3')} DALLE_3: {spent} cloud units"
        in summary
    )
    assert f"cloud quota {1000 - spent}/1000 units left" in summary  # the server charged the units
    assert NOISE_NOTE in text and "images are noise" in text
    assert len(list(out.glob("*.png"))) == len(demo_prompts)
    built = {p.name for p in cache.iterdir()}
    assert {"router-ckpt", "bundles", "ready.json"} <= built
    stamp = (cache / "ready.json").stat().st_mtime

    monkeypatch.setenv("ROUTET2I_DEMO_CACHE", str(cache))
    png = tmp_path / "fox.png"
    assert (
        edge_generate(["a red fox", "--demo", "--json", "--force", "cloud", "-o", str(png), "--no-progress"])
        == 0
    )
    captured = capfd.readouterr()
    result = json.loads(captured.out)  # printed by the demo's subprocess
    assert "Warning" not in captured.err and "Loading pipeline components" not in captured.err
    assert (result["route"], result["reason"], result["output"]) == ("cloud", "forced", str(png))
    # --force cloud: the router's best cloud model at the budget, charged its units by the server
    assert result["model"] in CLOUD_COSTS and result["quota"]["used"] == CLOUD_COSTS[result["model"]]
    assert png.is_file()
    # --model names one: the cheap tier, one unit
    assert edge_generate(["a red fox", "--demo", "--json", "--model", "SDXL_Base", "-o", str(png)]) == 0
    result = json.loads(capfd.readouterr().out)
    assert (result["route"], result["model"], result["quota"]["used"]) == ("cloud", "SDXL_Base", 1)
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
