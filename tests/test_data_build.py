"""`routet2i data build` end to end on the tiny pipelines: table, labels, resume after SIGKILL, shards."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from routet2i._errors import UsageError
from routet2i.training.cli import main
from routet2i.training.data_build import BuildConfig, build_table, model_name, parse_shard, prompt_seed
from routet2i.training.tables import read_table

PROMPTS = ["a red cat on a chair", "two dogs playing in the snow", "a castle on a hill", "an owl at night"]
TEN = 10


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "toy_prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def _argv(tiny: dict[str, Path], prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "data", "build", "--prompts", str(prompts), "--edge-pipeline", str(tiny["edge-sd21"]),
        "--cloud-pipeline", str(tiny["cloud-sd3"]), "--clip", str(tiny["clip"]), "--out", str(out),
        "--steps", "2", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def clean_table(
    tiny_models: dict[str, Path], prompt_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """One uninterrupted run over all prompts (batches of 2), images saved."""
    d = tmp_path_factory.mktemp("clean")
    assert (
        main(
            _argv(tiny_models, prompt_file, d / "t.csv", "--batch-size", "2", "--images-dir", str(d / "img"))
        )
        == 0
    )
    return d / "t.csv"


def _values(path: Path) -> pd.Series:
    df = read_table(path)
    return df.set_index(["prompt_id", "model", "metric"])["value"].sort_index()


def test_end_to_end_table_and_labels(clean_table: Path, tmp_path: Path) -> None:
    df = read_table(clean_table)
    assert len(df) == len(PROMPTS) * 2 * TEN
    assert set(df["dataset"]) == {"toy_prompts"} and set(df["model"]) == {"edge-sd21", "cloud-sd3"}
    assert df["prompt"].drop_duplicates().tolist() == PROMPTS
    assert np.all((df["value"] > 0) & (df["value"] < 1)) and set(df["n"]) == {1.0}
    assert df["value"].std() > 1e-4  # real scores, not a constant
    imgs = sorted((clean_table.parent / "img").rglob("*.png"))
    assert len(imgs) == 2 * len(PROMPTS)
    assert not clean_table.with_name("t.csv.parts").exists()
    assert not clean_table.with_name("t.csv.lock").exists()  # no lock file left behind
    out = tmp_path / "labels.csv"
    argv = ["labels", "--table", str(clean_table), "--dataset", "toy_prompts", "--edge-model", "edge-sd21"]
    assert main([*argv, "--cloud-model", "cloud-sd3", "--out", str(out)]) == 0
    labels = pd.read_csv(out)
    assert len(labels) == len(PROMPTS) and labels.shape[1] == 2 + TEN + 1
    assert labels["prs"].between(0, 1).all()


def test_rerun_without_resume_is_refused_and_resume_is_a_noop(
    tiny_models: dict[str, Path], prompt_file: Path, clean_table: Path, capsys: pytest.CaptureFixture
) -> None:
    before = clean_table.read_bytes()
    assert main(_argv(tiny_models, prompt_file, clean_table)) == 2
    err = capsys.readouterr().err
    assert "already holds 4 of these prompts" in err and "--resume" in err
    assert main(_argv(tiny_models, prompt_file, clean_table, "--resume")) == 0
    assert "0 prompts generated" in capsys.readouterr().out
    assert clean_table.read_bytes() == before
    assert not clean_table.with_name("t.csv.lock").exists()


def _hold_lock_in_turns(out: str, log: str) -> None:
    import os
    import time

    from routet2i.training.data_build import _locked

    for _ in range(15):
        with _locked(Path(out)):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\n")
            time.sleep(0.002)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\n")


def test_lock_is_exclusive_and_leaves_no_file(tmp_path: Path) -> None:
    """Processes taking the lock in turn never overlap, although each holder deletes the file on release."""
    import multiprocessing

    out, log = tmp_path / "t.csv", tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hold_lock_in_turns, args=(str(out), str(log))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    lines = log.read_text().split("\n")[:-1]
    assert len(lines) == 4 * 15 * 2
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("in ") and leave == "out " + enter[3:], (enter, leave)
    assert not out.with_name("t.csv.lock").exists()


KILLER = """
import os, signal, sys
from pathlib import Path
import routet2i.training.data_build as db
calls = {"n": 0}
orig = db._generate
def generate(*a, **k):
    calls["n"] += 1
    if calls["n"] == 3:  # edge pipeline of the second batch: the first batch's part is on disk
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(*a, **k)
db._generate = generate
prompts, edge, cloud, clip, out = sys.argv[1:6]
db.build_table(db.BuildConfig(prompts=Path(prompts), edge_pipeline=edge, cloud_pipeline=cloud, clip=clip,
                              out=Path(out), steps=2, batch_size=1, progress=False))
"""


def test_resume_after_sigkill(
    tiny_models: dict[str, Path], prompt_file: Path, clean_table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.csv"
    args = [
        str(prompt_file),
        str(tiny_models["edge-sd21"]),
        str(tiny_models["cloud-sd3"]),
        str(tiny_models["clip"]),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(KILLER), *args, str(out)], capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    parts = out.with_name("t.csv.parts")
    assert not out.exists()  # the table is only ever written whole
    assert len(list(parts.glob("*.csv"))) == 1  # the finished batch survived the kill
    (parts / ".half-written.csv.123.tmp").write_text("dataset,prompt_id,pro")  # a torn temp file is ignored
    assert main(_argv(tiny_models, prompt_file, out, "--batch-size", "3", "--resume")) == 0
    resumed, clean = _values(out), _values(clean_table)
    assert resumed.index.equals(clean.index)  # every prompt once, none twice
    np.testing.assert_allclose(resumed.to_numpy(), clean.to_numpy(), atol=1e-4)  # fixed per-prompt seeds


def test_shards_add_up(
    tiny_models: dict[str, Path], prompt_file: Path, clean_table: Path, tmp_path: Path
) -> None:
    out = tmp_path / "t.parquet"
    assert main(_argv(tiny_models, prompt_file, out, "--shard", "1/2")) == 0
    assert sorted(read_table(out)["prompt"].unique()) == sorted(PROMPTS[1::2])
    assert main(_argv(tiny_models, prompt_file, out, "--shard", "0/2")) == 0
    sharded, clean = _values(out), _values(clean_table)
    assert sharded.index.equals(clean.index)
    np.testing.assert_allclose(sharded.to_numpy(), clean.to_numpy(), atol=1e-4)


def test_images_per_prompt_limit_and_names(
    tiny_models: dict[str, Path], prompt_file: Path, tmp_path: Path
) -> None:
    cfg = BuildConfig(
        prompts=prompt_file,
        edge_pipeline=str(tiny_models["edge-sd21"]),
        cloud_pipeline=str(tiny_models["cloud-sd3"]),
        clip=str(tiny_models["clip"]),
        out=tmp_path / "t.csv",
        dataset="mine",
        edge_model="sd21",
        cloud_model="sd3",
        images_dir=tmp_path / "img",
        steps=1,
        images_per_prompt=2,
        limit=1,
        progress=False,
    )
    r = build_table(cfg)
    assert (r.n_generated, r.dataset, r.edge_model, r.cloud_model) == (1, "mine", "sd21", "sd3")
    df = read_table(cfg.out)
    assert len(df) == 2 * TEN and set(df["n"]) == {2.0} and set(df["model"]) == {"sd21", "sd3"}
    names = sorted(p.name for p in (tmp_path / "img" / "sd3").iterdir())
    assert len(names) == 2 and names[0].endswith("_0.png") and names[1].endswith("_1.png")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--shard", "2/2"], "--shard '2/2'"),
        (["--shard", "x"], "expected I/N"),
        (["--width", "64"], "--width and --height go together"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--edge-model", "m", "--cloud-model", "m"], "both 'm'"),
    ],
)
def test_bad_arguments(
    tiny_models: dict[str, Path],
    prompt_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    needle: str,
) -> None:
    assert main(_argv(tiny_models, prompt_file, tmp_path / "t.csv", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "t.csv").exists()


def test_out_format_and_pipeline_errors(
    tiny_models: dict[str, Path], prompt_file: Path, tmp_path: Path
) -> None:
    cfg = dict(prompts=prompt_file, clip=str(tiny_models["clip"]), progress=False, limit=1, steps=1)
    with pytest.raises(UsageError, match="--out"):
        build_table(BuildConfig(edge_pipeline="a", cloud_pipeline="b", out=tmp_path / "t.xlsx", **cfg))
    with pytest.raises(UsageError, match="--edge-pipeline"):
        build_table(
            BuildConfig(
                edge_pipeline=str(tmp_path / "missing"),
                cloud_pipeline=str(tiny_models["cloud-sd3"]),
                out=tmp_path / "t.csv",
                **cfg,
            )
        )
    with pytest.raises(UsageError, match="pipeline rejected"):  # SD2.1 needs sizes divisible by 8
        build_table(
            BuildConfig(
                edge_pipeline=str(tiny_models["edge-sd21"]),
                cloud_pipeline=str(tiny_models["cloud-sd3"]),
                out=tmp_path / "t.csv",
                width=60,
                height=60,
                **cfg,
            )
        )
    assert not (tmp_path / "t.csv").exists()


def test_seeds_and_names() -> None:
    assert prompt_seed(0, "p1") == prompt_seed(0, "p1") != prompt_seed(0, "p2")
    assert prompt_seed(0, "p1", 1) != prompt_seed(0, "p1", 0) != prompt_seed(1, "p1", 0)
    assert 0 <= prompt_seed(123, "x") < 2**31
    assert model_name("/models/edge-sd21/") == "edge-sd21"
    assert model_name("stabilityai/stable-diffusion-2-1") == "stable-diffusion-2-1"
    assert parse_shard("3/4") == (3, 4)


def test_ids_must_agree_with_the_table(
    tiny_models: dict[str, Path], clean_table: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    csv = tmp_path / "ids.csv"
    csv.write_text("id,prompt\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    before = clean_table.read_bytes()
    argv = _argv(tiny_models, csv, clean_table, "--dataset", "toy_prompts", "--id-column", "id", "--resume")
    assert main(argv) == 2
    assert "paired differently" in capsys.readouterr().err
    assert clean_table.read_bytes() == before
