"""The Python training API (`routet2i.training.train_router` / `export_router`) on the quick path: a small
synthetic table, a tiny random BERT backbone, a few epochs, then the ONNX bundle the device loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

WORDS = ["cat", "dog", "car", "tree", "house", "bird", "boat", "lamp"]


def _backbone(folder: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "and", "on", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=160)  # fmt: skip
    BertModel(cfg).save_pretrained(folder)
    return folder


def _table(path: Path, n: int = 24) -> Path:
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        k = 1 + i % 4
        prompt = " and ".join(f"a {w}" for w in rng.choice(WORDS, size=k, replace=False)) + f" on {i}"
        for model, base in (("edge", 3.5 - 0.4 * k), ("cloud", 3.0)):
            for metric in ("m1", "m2"):
                rows.append(("syn", f"p{i}", prompt, model, metric, base + rng.normal(0, 0.3), 3))
    cols = ["dataset", "prompt_id", "prompt", "model", "metric", "value", "n"]
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return root, _table(root / "table.csv"), _backbone(root / "backbone")


def test_train_then_export_through_the_api(setup, capsys):
    from routet2i.router_runtime import RouterSession
    from routet2i.training import export_router, train_router

    root, table, backbone = setup
    out = train_router(table, "syn", "edge", "cloud", root / "router", method="routet2i", backbone=str(backbone),
                       epochs=2, metrics=["m1", "m2"], weights=[1, 1], cache_dir=str(root / "cache"), seed=0)  # fmt: skip
    assert out == root / "router" and (out / "router.pt").is_file()
    assert "trained routet2i on 24 prompts" in capsys.readouterr().out
    result = export_router(out, root / "bundle", target_rate=0.3, exporter="torchscript", timing_runs=2)
    assert result.bundle == root / "bundle" and result.exporter == "torchscript"
    routing = json.loads((root / "bundle" / "routing.json").read_text())
    assert (routing["edge_model"], routing["cloud_model"]) == ("edge", "cloud")
    assert routing == result.routing and 0.0 <= routing["alpha"] <= 1.0
    prs, scores = RouterSession(root / "bundle").predict_one("a cat and a dog")
    assert 0.0 <= prs <= 1.0 and len(scores) == 2


def test_api_bad_input_is_a_usage_error(setup):
    from routet2i import UsageError
    from routet2i.training import export_router, train_router

    root, table, backbone = setup
    with pytest.raises(UsageError, match="unknown option 'epoch'; allowed: .*epochs"):
        train_router(table, "syn", "edge", "cloud", root / "x", epoch=2)
    with pytest.raises(UsageError, match="invalid choice: 'l1'"):
        train_router(table, "syn", "edge", "cloud", root / "x", loss="l1")
    with pytest.raises(UsageError, match="--router"):
        export_router(root / "no-router", root / "b")
    assert not (root / "x").exists() and not (root / "b").exists()


def test_cli_and_api_share_the_options():
    import argparse

    from routet2i.training import train
    from routet2i.training.api import _argv

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    argv = _argv({"metrics": ["a", "b"], "force": True, "top_k": None, "edge_model": "e"}, parser)
    assert argv == ["--metrics", "a,b", "--force", "--edge-model", "e"]
