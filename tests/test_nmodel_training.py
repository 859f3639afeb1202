"""N-model routing (issue 14): train with several --cloud-model, export with --costs, eval curves.

Tiny random backbone and a small synthetic table with an edge model and two cloud models of different
costs (fast: a few seconds per step)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from routet2i.training.cli import main
from test_train_eval import ADJ, WORDS, _build_backbone

MODELS = ("edge", "cheap", "dear")


def _build_table(path: Path, n: int = 40) -> Path:
    """Edge quality drops with the number of nouns; the cheap cloud model less so; the dear one not."""
    import pandas as pd

    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        k = 1 + i % 5
        words = list(rng.choice(WORDS, size=k, replace=False))
        prompt = " and ".join(f"a {rng.choice(ADJ)} {w}" for w in words) + f" on {i}"
        for model, base in zip(MODELS, (3.5 - 0.4 * k, 3.4 - 0.2 * k, 3.2), strict=True):
            for metric, scale in (("m1", 1.0), ("m2", 0.5)):
                rows.append(("syn", f"p{i}", prompt, model, metric, scale * (base + rng.normal(0, 0.3)), 3))
    pd.DataFrame(rows, columns=["dataset", "prompt_id", "prompt", "model", "metric", "value", "n"]).to_csv(
        path, index=False
    )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nmodel")
    s = {
        "root": root,
        "table": _build_table(root / "table.csv"),
        "backbone": _build_backbone(root / "backbone"),
        "cache": root / "cache",
    }
    base = ["--table", str(s["table"]), "--dataset", "syn", "--edge-model", "edge"]
    s["args"] = base + ["--cloud-model", "cheap", "--cloud-model", "dear"]  # type: ignore[assignment]
    common = [
        "--backbone",
        str(s["backbone"]),
        "--epochs",
        "2",
        "--max-length",
        "32",
        "--cache-dir",
        str(s["cache"]),
        "--force",
    ]
    s["common"] = common  # type: ignore[assignment]
    assert main(["train", *s["args"], "--out", str(root / "router"), *common]) == 0  # type: ignore[list-item]
    return s


def test_train_two_cloud_models(setup) -> None:
    import torch
    from routet2i.training.model import load_router

    model, ckpt = load_router(setup["root"] / "router")
    assert ckpt["models"] == list(MODELS) and ckpt["cloud_model"] == "cheap"
    assert np.asarray(ckpt["oof_model_scores"]).shape == (40, 3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(setup["root"] / "router" / "backbone")
    batch = tok(["a red cat", "a dog and a car and a tree on 3"], padding=True, return_tensors="pt")
    with torch.no_grad():
        prs, scores, model_scores = model(batch["input_ids"], batch["attention_mask"])
    assert prs.shape == (2,) and scores.shape == (2, 2) and model_scores.shape == (2, 3)


def test_export_with_costs_bundle_outputs_and_routing(setup) -> None:
    import onnxruntime as ort
    from routet2i.bundle import verify_manifest
    from tokenizers import Tokenizer

    out = setup["root"] / "bundle"
    code = main(
        ["export", "router", "--router", str(setup["root"] / "router"), "--out", str(out)]
        + ["--costs", "cheap=1,dear=3", "--exporter", "torchscript"]
    )
    assert code == 0
    routing = json.loads((out / "routing.json").read_text())
    assert routing["models"] == [
        {"name": "edge", "where": "edge", "cost": 0},
        {"name": "cheap", "where": "cloud", "cost": 1},
        {"name": "dear", "where": "cloud", "cost": 3},
    ]
    table = routing["budget_table"]
    budgets = [r["budget"] for r in table]
    lambdas = [r["lambda"] for r in table]
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
    assert lambdas == sorted(lambdas, reverse=True) and budgets[0] == 0.0
    assert budgets[0] <= routing["default_budget"] <= budgets[-1]
    verify_manifest(out)
    session = ort.InferenceSession(str(out / "router.onnx"), providers=["CPUExecutionProvider"])
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    enc = tok.encode_batch(["a red cat", "a dog and a car"])
    width = max(len(e.ids) for e in enc)
    ids = np.array([e.ids + [0] * (width - len(e.ids)) for e in enc], dtype=np.int64)
    mask = np.array([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in enc], dtype=np.int64)
    prs, metric_scores, model_scores = session.run(
        ["prs", "metric_scores", "model_scores"], {"input_ids": ids, "attention_mask": mask}
    )
    assert prs.shape == (2,) and metric_scores.shape == (2, 2) and model_scores.shape == (2, 3)


@pytest.mark.parametrize(
    ("costs", "needle"),
    [
        ("cheap=1", "lacks 'dear'"),
        ("cheap=1,dear=3,other=2", "'other'"),
        ("cheap=0,dear=3", "positive integer"),
        ("cheap=1.5,dear=3", "positive integer"),
        ("cheap", "CLOUD_MODEL=UNITS"),
    ],
)
def test_bad_costs_exit_2_with_one_line(setup, capsys, costs: str, needle: str) -> None:
    out = setup["root"] / "bad-bundle"
    code = main(
        ["export", "router", "--router", str(setup["root"] / "router"), "--out", str(out), "--costs", costs]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_several_cloud_models_need_multitask(setup, capsys) -> None:
    code = main(
        [
            "train",
            *setup["args"],
            "--out",
            str(setup["root"] / "r2"),
            "--method",
            "routet2i",
            *setup["common"],
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--method multitask" in err and len(err.splitlines()) == 1


def test_budget_table_and_choice() -> None:
    from routet2i.export.router import budget_table, choose

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(200, 3))
    table = budget_table(scores, [0, 1, 3])
    budgets = [r["budget"] for r in table]
    assert budgets == sorted(budgets) and budgets[0] == 0.0
    top = table[-1]
    assert np.isclose(np.asarray([0, 1, 3])[choose(scores, [0, 1, 3], top["lambda"])].mean(), top["budget"])


def test_eval_nmodel_report_keys_and_plot(setup) -> None:
    out = setup["root"] / "nm.json"
    code = main(
        [
            "eval",
            *setup["args"],
            "--costs",
            "cheap=1,dear=3",
            "--json",
            str(out),
            "--plot",
            str(out.with_suffix(".png")),
        ]
        + ["--folds", "2", "--seeds", "1", "--backbone", str(setup["backbone"]), "--max-length", "32"]
        + ["--set", "epochs=2", "--set", "n_mlp=1", "--cache-dir", str(setup["cache"])]
    )
    assert code == 0
    report = json.loads(out.read_text())
    nm = report["nmodel"]
    assert (
        report["cloud_models"] == ["cheap", "dear"]
        and nm["models"] == list(MODELS)
        and nm["costs"] == [0, 1, 3]
    )
    assert set(nm["curves"]) == {"router", "router_only_cheap", "router_only_dear", "random", "oracle"}
    for cv in nm["curves"].values():
        assert len(cv["budget"]) == len(cv["quality"]) == len(cv["cost"]) > 0
        assert all(c <= b + 1e-9 for b, c in zip(cv["budget"], cv["cost"], strict=True))
    row = nm["at_budget"]["1"]
    assert {"router", "oracle", "random", "best_single", "gain_over_best_single"} <= set(row)
    assert row["oracle"]["quality"] >= row["router"]["quality"] - 1e-9
    assert out.with_suffix(".png").stat().st_size > 0


def test_random_mix_and_policy_curve() -> None:
    from routet2i.training.nmodel_eval import policy_curve, random_mix_curve

    true = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    mix = random_mix_curve(true, [0, 1, 3], [0.0, 1.0, 3.0])
    assert np.allclose(mix["quality"], [0.0, 0.5, 1.0])
    oracle = policy_curve(true, true, [0, 1, 3], [0.0, 0.5, 1.5])
    assert np.allclose(oracle["quality"], [0.0, 0.5, 1.0]) and np.allclose(oracle["cost"], [0.0, 0.5, 1.5])


EVALMI = Path(__file__).resolve().parents[2] / "shared" / "data" / "quality" / "evalmi50k_dev.csv"


@pytest.mark.skipif(not EVALMI.is_file(), reason="../shared/data (EvalMi-50K) is not available")
def test_evalmi_nmodel_data_and_oracle_headroom() -> None:
    """The issue's premise on the dev file: per-prompt choice among tiers has value at 1 unit per prompt."""
    from routet2i.training.nmodel_eval import policy_curve, random_mix_curve
    from routet2i.training.tables import nmodel_data, read_table

    data = nmodel_data(read_table(EVALMI), "evalmi50k", "sd_v2-1", ["sdxl_base_1", "sd3_5_large"])
    assert data.quality.shape == (1590, 3) and data.models == ["sd_v2-1", "sdxl_base_1", "sd3_5_large"]
    oracle = policy_curve(data.quality, data.quality, [0, 1, 3], [1.0])
    mix = random_mix_curve(data.quality, [0, 1, 3], [1.0])
    assert oracle["cost"][0] <= 1.0 and oracle["quality"][0] > mix["quality"][0] + 0.03
