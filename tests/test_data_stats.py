"""Noun counting (offline tagger) and `routet2i data stats` (cloud win rate and gap by noun count)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from routet2i.training.cli import main
from routet2i.training.data_stats import combined_gap, noun_stats
from routet2i.training.nouns import count_nouns, nouns
from routet2i.training.tables import COLUMNS, PairData, write_table


def test_count_nouns() -> None:
    got = count_nouns(["Two dogs and a red cat on a wooden chair", "a photo", "", "very quickly"])
    assert got.dtype == np.int64 and got.tolist() == [3, 1, 0, 0]
    assert nouns("a castle on a hill") == ["castle", "hill"]
    with pytest.raises(TypeError, match="list of prompts"):
        count_nouns("a cat")


def test_tagger_needs_no_downloaded_data(tmp_path: Path) -> None:
    env = dict(os.environ, NLTK_DATA=str(tmp_path / "none"), HOME=str(tmp_path), TEXTBLOB_DATA=str(tmp_path))
    code = "from routet2i.training.nouns import count_nouns; print(count_nouns(['a cat and a dog']).tolist())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == "[2]"


def _pair() -> PairData:
    prompts = ["a cat", "a cat and a dog", "a cat, a dog and a bird", "a photo of a cat"]
    return PairData(
        dataset="toy",
        edge_model="e",
        cloud_model="c",
        metrics=["m1", "m2"],
        prompt_ids=["1", "2", "3", "4"],
        prompts=prompts,
        q_edge=np.array([[1.0, 0.0], [2.0, 1.0], [1.0, 0.0], [3.0, 1.0]]),
        q_cloud=np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 1.0], [2.0, 1.0]]),
    )


def test_combined_gap_by_hand() -> None:
    pair = _pair()
    both = np.concatenate([pair.q_edge, pair.q_cloud])
    sd = both.std(axis=0, ddof=1)  # pooled over both models
    expected = (
        0.5 * (pair.q_cloud[:, 0] - pair.q_edge[:, 0]) / sd[0]
        + 0.5 * (pair.q_cloud[:, 1] - pair.q_edge[:, 1]) / sd[1]
    )
    np.testing.assert_allclose(combined_gap(pair), expected)
    assert combined_gap(pair)[0] == 0.0  # identical qualities: a tie


def test_noun_stats_groups() -> None:
    rows, summary = noun_stats(_pair(), max_nouns=3)
    by = {r.nouns: r for r in rows}
    # noun counts: 1, 2, 3, 2 -> groups "1", "2", "3+"
    assert [r.nouns for r in rows] == ["1", "2", "3+", "all"]
    assert by["1"].prompts == 1 and by["1"].tie == 1.0
    assert by["2"].prompts == 2 and by["2"].edge_win == 1.0 and by["2"].mean_gap < 0
    assert by["3+"].cloud_win == 1.0 and by["3+"].mean_prs < 0.5
    assert by["all"].prompts == 4 and summary["cloud_win"] == 0.25 and summary["tie"] == 0.25


def test_cli_on_a_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pair = _pair()
    rows = []
    for i, (pid, prompt) in enumerate(zip(pair.prompt_ids, pair.prompts, strict=True)):
        for model, q in (("e", pair.q_edge), ("c", pair.q_cloud)):
            rows += [("toy", pid, prompt, model, m, q[i, j], None) for j, m in enumerate(pair.metrics)]
    table = write_table(pd.DataFrame(rows, columns=COLUMNS), tmp_path / "t.csv")
    argv = [
        "data",
        "stats",
        "--table",
        str(table),
        "--dataset",
        "toy",
        "--edge-model",
        "e",
        "--cloud-model",
        "c",
    ]
    assert main([*argv, "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "| nouns | prompts | cloud win %" in out and "| all | 4 |" in out
    assert json.loads((tmp_path / "s.json").read_text())["summary"]["prompts"] == 4
    assert main([*argv, "--max-nouns", "0"]) == 2


def test_genai_bench(quality_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["data", "stats", "--table", str(quality_csv), "--dataset", "genai_bench_527"]
    argv += ["--edge-model", "SDXL_2_1", "--cloud-model", "SDXL_Base", "--json", str(tmp_path / "s.json")]
    assert main(argv) == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    groups = [r for r in stats["rows"] if r["nouns"] != "all"]
    assert sum(r["prompts"] for r in groups) == 527
    for r in stats["rows"]:
        assert abs(r["cloud_win"] + r["tie"] + r["edge_win"] - 1) < 1e-9
    assert "genai_bench_527: SDXL_2_1 (edge) -> SDXL_Base (cloud), 527 prompts" in capsys.readouterr().out
