"""Quality tables: round trips, validation errors (one line each), image averaging, pairing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from routet2i._errors import UsageError
from routet2i.training.tables import COLUMNS, pair_data, read_table, write_table


def _table() -> pd.DataFrame:
    rows = []
    for pid, prompt in (("001", "a cat"), ("002", "NA"), ("003", "two dogs, one ball")):
        for model, base in (("edge", 1.0), ("cloud", 2.0)):
            for j, metric in enumerate(("sharp", "color")):
                rows.append(("toy", pid, prompt, model, metric, base + j + int(pid) / 10, 3))
    return pd.DataFrame(rows, columns=COLUMNS)


def _write_csv(tmp_path: Path, df: pd.DataFrame, name: str = "t.csv") -> Path:
    p = tmp_path / name
    df.to_csv(p, index=False)
    return p


@pytest.mark.parametrize("name", ["t.csv", "t.parquet", "t.csv.gz"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    df = _table()
    p = write_table(df, tmp_path / name)
    back = read_table(p)
    assert back["prompt_id"].tolist() == df["prompt_id"].tolist()  # "001" stays text
    assert back["prompt"].tolist() == df["prompt"].tolist()  # "NA" is a prompt, not a missing value
    np.testing.assert_allclose(back["value"], df["value"])
    assert back["n"].tolist() == [3.0] * len(df)
    assert [f.name for f in tmp_path.iterdir()] == [name]  # no temp file left behind


def test_csv_writes_integral_n_and_empty_n(tmp_path: Path) -> None:
    df = _table()
    df.loc[0, "n"] = None
    text = write_table(df, tmp_path / "t.csv").read_text()
    first, second = text.splitlines()[1:3]
    assert first.endswith(",") and second.endswith(",3")
    assert np.isnan(read_table(tmp_path / "t.csv")["n"].iloc[0])


def _one_line_error(path: Path) -> str:
    with pytest.raises(UsageError) as info:
        read_table(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_columns(tmp_path: Path) -> None:
    msg = _one_line_error(_write_csv(tmp_path, _table().drop(columns=["metric", "n"])))
    assert "missing column(s) metric, n" in msg


def test_duplicate_keys(tmp_path: Path) -> None:
    df = _table()
    df = pd.concat([df, df.iloc[[4]]], ignore_index=True)
    msg = _one_line_error(_write_csv(tmp_path, df))
    assert "1 duplicate" in msg and "'002'" in msg and "image" in msg


@pytest.mark.parametrize("bad", ["inf", "nan", "", "-inf"])
def test_non_finite_values(tmp_path: Path, bad: str) -> None:
    df = _table().astype({"value": "object"})
    df.loc[5, "value"] = bad
    msg = _one_line_error(_write_csv(tmp_path, df))
    assert "non-finite" in msg and "row 6" in msg


def test_non_numeric_value(tmp_path: Path) -> None:
    df = _table().astype({"value": "object"})
    df.loc[2, "value"] = "good"
    assert "'value' is not a number at row 3" in _one_line_error(_write_csv(tmp_path, df))


def test_empty_text_and_clashing_ids(tmp_path: Path) -> None:
    df = _table()
    df.loc[1, "model"] = ""
    assert "empty 'model'" in _one_line_error(_write_csv(tmp_path, df))
    df = _table()
    df.loc[df["prompt_id"] == "003", "prompt_id"] = "001"
    assert "several prompt texts" in _one_line_error(_write_csv(tmp_path, df))


def test_unreadable_and_absent(tmp_path: Path) -> None:
    assert "does not exist" in _one_line_error(tmp_path / "nope.csv")
    assert "is a folder" in _one_line_error(tmp_path)  # was "does not exist": misleading
    p = tmp_path / "bad.parquet"
    p.write_text("not parquet")
    assert "cannot read" in _one_line_error(p)


def test_failed_write_leaves_old_file(tmp_path: Path) -> None:
    p = write_table(_table(), tmp_path / "t.csv")
    before = p.read_bytes()
    bad = _table()
    bad.loc[0, "value"] = np.inf
    with pytest.raises(UsageError):
        write_table(bad, p)
    assert p.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_several_images_are_averaged(tmp_path: Path) -> None:
    df = _table()
    extra = df.copy()
    extra["value"] = extra["value"] + 1.0
    df["image"], extra["image"] = "seed0", "seed1"
    p = _write_csv(tmp_path, pd.concat([df, extra], ignore_index=True))
    back = read_table(p)
    assert len(back) == len(df) and list(back.columns) == COLUMNS
    np.testing.assert_allclose(back["value"], _table()["value"] + 0.5)
    assert back["n"].tolist() == [2.0] * len(df)
    assert len(read_table(p, average=False)) == 2 * len(df)


def test_pair_data_aligns_and_drops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    df = _table()
    df = df[~((df["prompt_id"] == "002") & (df["model"] == "cloud") & (df["metric"] == "color"))]
    with caplog.at_level(logging.WARNING):
        pd_ = pair_data(read_table(_write_csv(tmp_path, df)), "toy", "edge", "cloud")
    assert "1 of 3 prompts dropped" in caplog.text
    assert pd_.metrics == ["sharp", "color"]
    assert pd_.prompt_ids == ["001", "003"] and pd_.prompts == ["a cat", "two dogs, one ball"]
    np.testing.assert_allclose(pd_.q_edge, [[1.1, 2.1], [1.3, 2.3]])
    np.testing.assert_allclose(pd_.q_cloud, [[2.1, 3.1], [2.3, 3.3]])
    only = pair_data(df, "toy", "cloud", "edge", metrics=["color"])
    assert only.metrics == ["color"] and len(only) == 2


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("nope", "edge", "cloud", None), "--dataset 'nope' is not in the table; datasets: toy"),
        (("toy", "big", "cloud", None), "--edge-model 'big' is not in dataset 'toy'; models: edge, cloud"),
        (("toy", "edge", "big", None), "--cloud-model 'big'"),
        (("toy", "edge", "edge", None), "must differ"),
        (
            ("toy", "edge", "cloud", ["sharp", "nope"]),
            "metric 'nope' is not in dataset 'toy' for model 'edge'; metrics: sharp, color",
        ),
        (("toy", "edge", "cloud", []), "--metrics is empty"),
    ],
)
def test_pair_data_unknown_names(args: tuple, needle: str) -> None:
    with pytest.raises(UsageError, match=None) as info:
        pair_data(_table(), *args)
    assert needle in str(info.value)


def test_public_table_reads_as_is(quality_csv: Path) -> None:
    df = read_table(quality_csv)
    assert set(df["dataset"]) == {"genai_bench_527", "tifa160", "agiqa3k"}
    pair = pair_data(df, "genai_bench_527", "SDXL_2_1", "SDXL_Base")
    assert pair.q_edge.shape == (527, 1) and pair.prompt_ids[0] == "00001"
    assert np.all((pair.q_edge >= 1) & (pair.q_edge <= 5))
