"""`routet2i labels`: a hand-computed case, edge/cloud symmetry, every public dataset, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from routet2i.training.cli import main
from routet2i.training.tables import COLUMNS, write_table

# Same numbers as tests/test_prs.py: mu_e = [2, 0.7], mu_c = [1.5, 0.4] -> D = sigmoid([[2, -1/3], [0, 7/3]]).
D_HAND = np.array([[0.8807970779778823, 0.4174297935376853], [0.5, 0.9116003227929417]])


@pytest.fixture
def toy_table(tmp_path: Path) -> Path:
    q = {"edge": [[3.0, 0.5], [1.0, 0.9]], "cloud": [[2.0, 0.6], [1.0, 0.2]]}
    rows = [
        ("toy", pid, f"prompt {pid}", model, metric, q[model][i][j], None)
        for i, pid in enumerate(("p1", "p2"))
        for model in q
        for j, metric in enumerate(("detail", "color"))
    ]
    # a third prompt with only one metric for the cloud: dropped
    rows += [("toy", "p3", "prompt p3", "edge", m, 1.0, None) for m in ("detail", "color")]
    rows += [("toy", "p3", "prompt p3", "cloud", "detail", 1.0, None)]
    return write_table(pd.DataFrame(rows, columns=COLUMNS), tmp_path / "toy.csv")


def _labels(table: Path, out: Path, *extra: str, edge: str = "edge", cloud: str = "cloud") -> pd.DataFrame:
    argv = ["labels", "--table", str(table), "--dataset", "toy", "--edge-model", edge, "--cloud-model", cloud]
    assert main([*argv, "--out", str(out), "--eps", "1e-12", *extra]) == 0
    return pd.read_csv(out, dtype={"prompt_id": str})


def test_hand_computed(toy_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    df = _labels(toy_table, tmp_path / "l.csv")
    assert list(df.columns) == ["prompt_id", "prompt", "D_detail", "D_color", "prs"]
    assert df["prompt_id"].tolist() == ["p1", "p2"]  # p3 misses a cloud metric
    np.testing.assert_allclose(df[["D_detail", "D_color"]], D_HAND, atol=1e-9)
    np.testing.assert_allclose(df["prs"], D_HAND.mean(axis=1), atol=1e-9)
    assert "wrote 2 labels" in capsys.readouterr().out


def test_weights_gamma_and_subset(toy_table: Path, tmp_path: Path) -> None:
    df = _labels(toy_table, tmp_path / "w.csv", "--weights", "color=3,detail=1")
    np.testing.assert_allclose(df["prs"], D_HAND @ [0.25, 0.75], atol=1e-9)
    df = _labels(toy_table, tmp_path / "g.csv", "--gamma", "2", "--metrics", "detail")
    assert list(df.columns) == ["prompt_id", "prompt", "D_detail", "prs"]
    # metric subset: p3 has 'detail' for both models, so it is kept; mu_e = 5/3, mu_c = 4/3 over 3 prompts
    assert df["prompt_id"].tolist() == ["p1", "p2", "p3"]
    np.testing.assert_allclose(
        df["D_detail"], 1 / (1 + np.exp(-np.array([1.0, 0.0, 0.0]) / (2 / 3))), atol=1e-9
    )


def test_swap_gives_one_minus_d(toy_table: Path, tmp_path: Path) -> None:
    a = _labels(toy_table, tmp_path / "a.csv")
    b = _labels(toy_table, tmp_path / "b.csv", edge="cloud", cloud="edge")
    np.testing.assert_allclose(
        b[["D_detail", "D_color", "prs"]], 1 - a[["D_detail", "D_color", "prs"]], atol=1e-12
    )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--dataset", "nope"], "datasets: toy"),
        (["--edge-model", "big"], "models: edge, cloud"),
        (["--metrics", "detail,sharpness"], "metrics: detail, color"),
        (["--weights", "1,2,3"], "--weights has 3 value(s) for 2 metric(s)"),
        (["--weights", "sharp=1"], "unknown metric(s) sharp"),
        (["--gamma", "0"], "gamma must be"),
    ],
)
def test_bad_arguments_exit_2_one_line(
    toy_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], needle: str
) -> None:
    base = ["labels", "--table", str(toy_table), "--dataset", "toy", "--edge-model", "edge"]
    base += ["--cloud-model", "cloud", "--out", str(tmp_path / "x.csv")]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "x.csv").exists()


PUBLIC_PAIRS = [
    ("genai_bench_527", "SDXL_2_1", "SDXL_Base", 527, 1),
    ("tifa160", "stable_diffusion_v1_5", "stable_diffusion_v2_1", 160, 5),
    ("agiqa3k", "sd1.5_normal", "xl2.2_normal", 300, 2),
]


@pytest.mark.parametrize(("dataset", "edge", "cloud", "n", "k"), PUBLIC_PAIRS)
def test_public_datasets(
    quality_csv: Path, tmp_path: Path, dataset: str, edge: str, cloud: str, n: int, k: int
) -> None:
    out = tmp_path / f"{dataset}.csv"
    argv = ["labels", "--table", str(quality_csv), "--dataset", dataset, "--edge-model", edge]
    assert main([*argv, "--cloud-model", cloud, "--out", str(out)]) == 0
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == n and df.shape[1] == 2 + k + 1
    d = df.filter(like="D_").to_numpy()
    assert np.all((d >= 0) & (d <= 1)) and np.all(np.isfinite(df["prs"]))
    assert 0.2 < df["prs"].mean() < 0.8  # both models win some prompts
    assert df["prompt_id"].is_unique


def test_every_public_dataset_is_covered(quality_csv: Path) -> None:
    datasets = set(pd.read_csv(quality_csv, usecols=["dataset"])["dataset"])
    assert datasets == {p[0] for p in PUBLIC_PAIRS}
