"""`routet2i train` and `routet2i eval` end to end on a small synthetic table with a tiny random backbone.

Also: the evaluation arithmetic (folds, per-fold routing counts, pooled Delta P, cloud saving),
calibration, bad input (one-line errors, exit 2), and a check that every registered method has a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from routet2i.training.baselines import METHODS, RULE_METHODS
from routet2i.training.cli import main

WORDS = ["cat", "dog", "car", "tree", "house", "bird", "boat", "lamp", "chair", "apple", "horse", "cup"]
ADJ = ["red", "small", "old", "shiny", "blue"]


def _build_backbone(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "and", "with", "on"] + WORDS + ADJ
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(folder)
    return folder


def _build_table(path: Path, n: int = 40) -> Path:
    """Edge quality drops with the number of nouns; the cloud does not care (plus noise)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        k = 1 + i % 5
        words = list(rng.choice(WORDS, size=k, replace=False))
        prompt = " and ".join(f"a {rng.choice(ADJ)} {w}" for w in words) + f" on {i}"
        for model, base in (("edge", 3.5 - 0.4 * k), ("cloud", 3.0)):
            for metric, scale in (("m1", 1.0), ("m2", 0.5)):
                value = scale * (base + rng.normal(0, 0.3))
                rows.append(("syn", f"p{i}", prompt, model, metric, value, 3))
    pd.DataFrame(rows, columns=["dataset", "prompt_id", "prompt", "model", "metric", "value", "n"]).to_csv(
        path, index=False
    )
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("router")
    return {
        "root": root,
        "table": _build_table(root / "table.csv"),
        "backbone": _build_backbone(root / "backbone"),
        "cache": root / "cache",
    }


def _pair_args(s: dict[str, Path]) -> list[str]:
    return ["--table", str(s["table"]), "--dataset", "syn", "--edge-model", "edge", "--cloud-model", "cloud"]


def _train(s: dict[str, Path], out: Path, method: str, seed: int = 0) -> int:
    return main(
        ["train", *_pair_args(s), "--out", str(out), "--method", method, "--backbone", str(s["backbone"])]
        + ["--seed", str(seed), "--epochs", "4", "--cache-dir", str(s["cache"]), "--force"]
    )


# ---------------------------------------------------------------------------------- train


def test_train_writes_the_router_dir_contract(setup) -> None:
    from routet2i.training.model import load_router

    out = setup["root"] / "r-routet2i"
    assert _train(setup, out, "routet2i") == 0
    assert (out / "router.pt").is_file() and (out / "backbone" / "config.json").is_file()
    assert (out / "backbone" / "vocab.txt").is_file() or (out / "backbone" / "tokenizer.json").is_file()
    model, ckpt = load_router(out)
    for key in (
        "config",
        "state_dict",
        "metrics",
        "weights",
        "gamma",
        "edge_model",
        "cloud_model",
        "dataset",
        "method",
        "calibration",
    ):
        assert key in ckpt, key
    assert ckpt["metrics"] == ["m1", "m2"] and ckpt["edge_model"] == "edge" and ckpt["method"] == "routet2i"
    assert ckpt["config"]["hidden_size"] == 32 and not model.training
    rates = [c["rate"] for c in ckpt["calibration"]]
    alphas = [c["alpha"] for c in ckpt["calibration"]]
    assert rates[0] == 0.0 and rates[-1] == 1.0 and alphas == sorted(alphas) and max(alphas) <= 0.5
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "backbone")
    batch = tok(["a red cat", "a dog and a car and a tree on 3"], padding=True, return_tensors="pt")
    with torch.no_grad():
        prs, scores = model(batch["input_ids"], batch["attention_mask"])
    assert prs.shape == (2,) and scores.shape == (2, 2)
    assert torch.all((prs > 0) & (prs < 1))


def test_train_is_deterministic_with_a_seed(setup) -> None:
    a, b = setup["root"] / "det-a", setup["root"] / "det-b"
    assert _train(setup, a, "routet2i", seed=7) == 0
    assert _train(setup, b, "routet2i", seed=7) == 0
    sa = torch.load(a / "router.pt", weights_only=True)["state_dict"]
    sb = torch.load(b / "router.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------- eval


def test_eval_json_plot_and_invariants(setup) -> None:
    report_path, plot = setup["root"] / "report.json", setup["root"] / "curves.png"
    args = ["eval", *_pair_args(setup), "--json", str(report_path), "--plot", str(plot)]
    args += ["--folds", "2", "--seeds", "2", "--backbone", str(setup["backbone"]), "--bootstrap", "50"]
    args += ["--set", "max_epochs=3", "--cache-dir", str(setup["cache"])]
    assert main(args) == 0
    report = json.loads(report_path.read_text())
    for key in ("dataset", "edge_model", "cloud_model", "metrics", "n_prompts", "folds", "seeds", "methods"):
        assert key in report, key
    assert report["n_prompts"] == 40 and report["folds"] == 2 and report["seeds"] == 2
    assert set(report["methods"]) == set(METHODS)  # every method, the three ablations included
    for m, e in report["methods"].items():
        assert set(e["delta_p"]) == set(e["delta_p_std"]) == {"0.3", "0.5", "0.7"}, m
        assert set(e["cloud_saving"]) == {"40", "50", "60"}, m
        assert all(np.isfinite(v) for v in e["delta_p"].values()), m
        assert all(0 <= v <= 100 for v in e["cloud_saving"].values()), m
        lo, hi = e["delta_p_ci95"]["0.5"]
        assert lo <= hi
    # The oracle routes the largest true gaps of each fold: nothing beats it at a fixed rate.
    for r in ("0.3", "0.5", "0.7"):
        best = max(e["delta_p"][r] for e in report["methods"].values())
        assert report["methods"]["oracle"]["delta_p"][r] >= best - 1e-9
    # On this table the edge loses more with more nouns, so noun_count beats random clearly.
    assert (
        report["methods"]["noun_count"]["delta_p"]["0.5"] > report["methods"]["random"]["delta_p"]["0.5"] + 10
    )
    assert plot.stat().st_size > 10_000


# ---------------------------------------------------------------------------------- arithmetic


def test_folds_keep_identical_texts_together() -> None:
    from routet2i.training.evaluate import folds_by_text

    prompts = ["a", "b", "a", "c", "d", "b", "e"]
    f = folds_by_text(prompts, 3, seed=1)
    assert f[0] == f[2] and f[1] == f[5]
    assert set(f.tolist()) == {0, 1, 2}
    assert np.array_equal(f, folds_by_text(prompts, 3, seed=1))


def test_cloud_mask_counts_per_fold_and_delta_p() -> None:
    from routet2i.training.evaluate import cloud_mask, delta_p_curve

    fold = np.array([0] * 5 + [1] * 4)
    scores = np.array([5, 1, 4, 2, 3, 9, 8, 7, 6], dtype=float)
    tb = np.arange(9)
    mask = cloud_mask(scores, fold, 0.5, tb)
    assert mask[:5].sum() == 3 and mask[5:].sum() == 2  # round half up of 2.5 and 2.0
    assert mask[[1, 3, 4]].all() and mask[[7, 8]].all()
    gap = np.array([0, 4, 0, 2, 1, 0, 0, 1, 2], dtype=float)  # oracle-like order: all gain collected
    curve = delta_p_curve(scores, fold, gap[:, None], tb, np.array([0.0, 0.5, 1.0]))
    assert curve[:, 0].tolist() == [0.0, 100.0, 100.0]


def test_cloud_saving_from_the_curve() -> None:
    from routet2i.training.evaluate import GRID, _saving

    assert _saving(100 * GRID, 40) == pytest.approx(60.0)  # random-like: rate 0.40 reaches 40
    assert _saving(np.minimum(100.0, 200 * GRID), 50) == pytest.approx(75.0)


def test_calibration_alpha_is_capped_quantile() -> None:
    from routet2i._errors import UsageError
    from routet2i.training.calibration import alpha_for_rate, alpha_from_table, calibration_table

    prs = np.linspace(0.2, 0.8, 61)
    assert alpha_for_rate(prs, 0.25) == pytest.approx(0.35)
    assert alpha_for_rate(prs, 0.9) == 0.5  # capped: edge-better prompts stay on the edge
    table = calibration_table(prs)
    assert alpha_from_table(table, 0.255) == pytest.approx(alpha_for_rate(prs, 0.25))
    with pytest.raises(UsageError):
        alpha_for_rate(prs, 1.5)


# ---------------------------------------------------------------------------------- every method


# Written out: test_each_method is parametrized over exactly these, and test_all_methods_tested fails when
# the registry (METHODS) gains or loses a method this list does not name.
TESTED_METHODS = {
    "gap_regression", "hybrid_llm", "multitask", "noun_count", "oracle", "random", "routellm_bert", "routet2i",
    "routet2i_no_dual_gate", "routet2i_no_multimetric", "routet2i_no_token_selection", "zooter",
}  # fmt: skip


@pytest.mark.parametrize("method", sorted(TESTED_METHODS))
def test_each_method(setup, method: str) -> None:
    """Every method scores out-of-fold; every trained one also trains, saves and reloads as a router."""
    from routet2i.prs import normalize_weights
    from routet2i.training.evaluate import evaluate_pair
    from routet2i.training.model import load_router
    from routet2i.training.tables import pair_data, read_table
    from routet2i.training.train import TrainConfig

    pair = pair_data(read_table(setup["table"]), "syn", "edge", "cloud")
    report = evaluate_pair(
        pair,
        normalize_weights(None, 2),
        [method],
        folds=2,
        seeds=1,
        backbone=str(setup["backbone"]),
        train_cfg=TrainConfig(max_epochs=2),
        n_boot=0,
        cache_dir=str(setup["cache"]),
        progress=False,
    )
    curve = report["methods"][method]["curve"]["delta_p"]
    assert curve[0] == 0.0 and curve[-1] == pytest.approx(100.0)
    if method in RULE_METHODS:
        assert _train(setup, setup["root"] / f"r-{method}", method) == 2  # not a trainable router
        return
    out = setup["root"] / f"r-{method}"
    assert _train(setup, out, method) == 0
    model, ckpt = load_router(out)
    assert ckpt["method"] == method
    ids = torch.tensor([[2, 5, 9, 3], [2, 5, 10, 3]])
    with torch.no_grad():
        prs, scores = model(ids, torch.ones_like(ids))
    assert prs.shape == (2,) and scores.shape[0] == 2 and torch.all((prs >= 0) & (prs <= 1))


def test_all_methods_tested() -> None:
    """Fails when a method is registered in METHODS without being in the per-method test."""
    from routet2i.training.train import TRAINABLE

    missing = set(METHODS) - TESTED_METHODS
    assert not missing, f"methods without a test: {sorted(missing)}"
    gone = TESTED_METHODS - set(METHODS)
    assert not gone, f"tested methods no longer registered: {sorted(gone)}"
    assert set(TRAINABLE) | set(RULE_METHODS) == set(METHODS)


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--rates", "0.3,1.5"], "outside (0, 1)"),
        (["--rates", "0"], "outside (0, 1)"),
        (["--methods", "routet2i,magic"], "available: routet2i"),
        (["--folds", "41"], "fewer than --folds"),
        (["--metrics", "m1,nope"], "metrics: m1, m2"),
        (["--set", "bogus=1"], "KEY=VALUE"),
    ],
)
def test_eval_bad_input_exits_2_with_one_line(setup, capsys, extra: list[str], needle: str) -> None:
    args = ["eval", *_pair_args(setup), "--json", str(setup["root"] / "bad.json"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (setup["root"] / "bad.json").exists()


@pytest.mark.parametrize(
    ("swap", "needle"),
    [
        (("--dataset", "nope"), "datasets: syn"),
        (("--edge-model", "nope"), "models: edge, cloud"),
        (("--cloud-model", "nope"), "models: edge, cloud"),
    ],
)
def test_train_and_eval_unknown_names_exit_2(setup, capsys, swap: tuple[str, str], needle: str) -> None:
    pair = _pair_args(setup)
    pair[pair.index(swap[0]) + 1] = swap[1]
    for cmd in (["train", *pair, "--out", str(setup["root"] / "bad")], ["eval", *pair, "--json", "x.json"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err


def test_train_and_eval_bad_output_paths_exit_2_before_work(setup, capsys) -> None:
    blocker = setup["root"] / "blocker"
    blocker.write_text("a file, not a folder")
    cases = [
        (["train", *_pair_args(setup), "--out", str(blocker / "r")], "is a file, not a folder"),
        (["train", *_pair_args(setup), "--out", str(blocker)], "exists and is not a folder"),
        (["eval", *_pair_args(setup), "--json", str(blocker / "r.json")], "is a file, not a folder"),
        (
            ["eval", *_pair_args(setup), "--json", str(setup["root"] / "ok.json"), "--plot", "p.txt"],
            "must end in",
        ),
    ]
    for cmd, needle in cases:
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1, err
    assert not (setup["root"] / "ok.json").exists()


def test_train_unloadable_backbone_exits_2(setup, capsys) -> None:
    out = setup["root"] / "bad-backbone"
    cmd = [
        "train",
        *_pair_args(setup),
        "--out",
        str(out),
        "--backbone",
        str(setup["root"] / "no-such-encoder"),
    ]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip()
    assert "--backbone" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_trained_router_dir_has_normal_permissions(setup) -> None:
    out = setup["root"] / "r-perms"
    assert _train(setup, out, "routet2i") == 0
    assert out.stat().st_mode & 0o755 == 0o755


def test_train_rule_method_exits_2(setup, capsys) -> None:
    assert main(["train", *_pair_args(setup), "--out", str(setup["root"] / "bad"), "--method", "oracle"]) == 2
    assert "not a trainable router" in capsys.readouterr().err


def test_token_states_are_computed_once_and_cached(setup, tmp_path) -> None:
    from routet2i.training import features

    prompts = ["a red cat", "a dog and a car", "a cup"]
    first = features.token_states(prompts, str(setup["backbone"]), 32, cache_dir=tmp_path)
    assert features.token_states(prompts, str(setup["backbone"]), 32, cache_dir=tmp_path) is first  # memory
    assert len(list(tmp_path.glob("*.pt"))) == 1
    features._MEMORY.clear()
    warm = features.token_states(prompts, str(setup["backbone"]), 32, cache_dir=tmp_path)  # from disk
    assert warm is not first and torch.equal(warm.states, first.states) and torch.equal(warm.mask, first.mask)
    assert first.states.shape[:2] == first.mask.shape and first.mask.sum(1).tolist() == [5, 7, 4]  # CLS/SEP
    s, m = first.subset([2])
    assert s.shape[1] == 4 and m.shape == (1, 4)  # trimmed to the longest prompt of the subset
    other = features.token_states(prompts[:2], str(setup["backbone"]), 32, cache_dir=tmp_path)
    assert other.key != first.key


# ---------------------------------------------------------------------------------- bounds (issue 11)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--lr", "nan"], "--lr must be a finite number > 0"),
        (["--lr", "-1"], "--lr must be a finite number > 0"),
        (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0"),
        (["--top-k", "0"], "--top-k must be a finite number >= 1"),
        (["--top-k", "100000"], "--top-k must be"),
        (["--seed", "-1"], "--seed must be a finite number >= 0"),
        (["--n-layers", "-1"], "--n-layers must be a finite number >= 0"),
        (["--patience", "-1"], "--patience must be a finite number >= 0"),
    ],
)
def test_train_bad_settings_exit_2_before_work(setup, capsys, monkeypatch, extra, needle) -> None:
    from routet2i.training import train

    def no_work(*a, **k):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(train, "load_pair", no_work)
    out = setup["root"] / "bad-settings"
    assert main(["train", *_pair_args(setup), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("item", "needle"),
    [
        ("top_k=x", "--set top_k must be an integer"),
        ("top_k=0", "--set top_k must be a finite number >= 1"),
        ("lr=-1", "--set lr must be a finite number > 0"),
        ("lr=nan", "--set lr must be a finite number > 0"),
        ("n_layers=-1", "--set n_layers must be"),
    ],
)
def test_eval_bad_set_values_exit_2_before_work(setup, capsys, monkeypatch, item, needle) -> None:
    from routet2i.training import train

    def no_work(*a, **k):
        raise AssertionError("work started before the settings were checked")

    monkeypatch.setattr(train, "load_pair", no_work)
    out = setup["root"] / "bad-set.json"
    assert main(["eval", *_pair_args(setup), "--json", str(out), "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_train_refuses_a_non_empty_out_without_force(setup, capsys) -> None:
    out = setup["root"] / "occupied"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cmd = ["train", *_pair_args(setup), "--out", str(out), "--backbone", str(setup["backbone"])]
    cmd += ["--epochs", "2", "--cache-dir", str(setup["cache"])]
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip()
    assert "not empty" in err and "--force" in err and len(err.splitlines()) == 1, err
    assert (out / "keep.txt").read_text() == "mine"
    assert main([*cmd, "--force"]) == 0
    assert (out / "router.pt").is_file() and not (out / "keep.txt").exists()


# ---------------------------------------------------------------------------------- the default router


def test_default_method_is_multitask_calibrated_out_of_fold(setup) -> None:
    from routet2i.training.methods import DEFAULT_METHOD

    out = setup["root"] / "r-default"
    cmd = ["train", *_pair_args(setup), "--out", str(out), "--backbone", str(setup["backbone"])]
    assert main([*cmd, "--epochs", "3", "--cache-dir", str(setup["cache"])]) == 0
    ckpt = torch.load(out / "router.pt", weights_only=True)
    assert DEFAULT_METHOD == "multitask" and ckpt["method"] == "multitask"
    assert "out-of-fold" in ckpt["calibration_source"] and ckpt["n_calibration"] == 40
    alphas = [c["alpha"] for c in ckpt["calibration"]]
    assert alphas == sorted(alphas) and max(alphas) <= 0.5
    assert ckpt["auxiliary_models"] == ["edge", "cloud"]


def test_multitask_learns_and_out_of_fold_calibration_holds_on_new_prompts() -> None:
    """Synthetic: the gap is a function of the features; the router ranks unseen prompts by it, and the
    alpha from out-of-fold predictions sends about the target share of unseen prompts to the cloud."""
    from types import SimpleNamespace

    from routet2i.export.router import pick_alpha
    from routet2i.training.calibration import calibration_table
    from routet2i.training.multitask import MultiTaskConfig, fit_and_calibrate, predict_multitask

    rng = np.random.default_rng(0)
    n = 800
    x = rng.normal(size=(n, 8))
    gap = x[:, 0] + 0.5 * np.tanh(x[:, 1]) + 0.3 * rng.normal(size=n)
    q_edge = np.stack([1.0 - 0.5 * gap, 2.0 - gap], axis=1)
    q_cloud = np.stack([1.0 + 0.5 * gap, 2.0 + gap], axis=1)
    pair = SimpleNamespace(
        metrics=["m1", "m2"], prompts=[f"p{i}" for i in range(n)], q_edge=q_edge, q_cloud=q_cloud,
        all_models=["e", "c"], q_all=np.stack([q_edge, q_cloud], axis=1), edge_model="e", cloud_model="c",
    )  # fmt: skip
    train, test = np.arange(400), np.arange(400, n)
    cfg = MultiTaskConfig(metrics=["m1", "m2"], hidden_size=8, n_mlp=2, hidden=32, epochs=10)
    module, oof, folds = fit_and_calibrate(x, pair, train, cfg, seed=0)
    assert folds == 5 and oof.shape == (400,)
    prs = predict_multitask(module, x[test])
    assert np.corrcoef(prs, -gap[test])[0, 1] > 0.8
    rate = float(np.mean(prs < pick_alpha(calibration_table(oof), 0.3)))
    assert abs(rate - 0.3) < 0.06, rate
