"""The torch-free router runtime: a router bundle (CONTRACTS.md section 3) through RouterSession.

Two bundles: one made here from a small torch module with the contract's graph signature (so the numbers
can be checked against torch on transformers' tokenization), and the real `routet2i export router` output
of a briefly trained router."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from _device_bundles import MAX_LENGTH, METRICS, handmade_router_bundle
from routet2i._errors import BundleError, BundleFileMissing
from routet2i.bundle import write_manifest
from routet2i.router_runtime import RouterSession

torch = pytest.importorskip("torch")

PROMPTS = [
    "a red fox in the snow",
    "A photo of an astronaut riding a horse on the moon, highly detailed, 8k",
    "two cats",
]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory) -> tuple[Path, object]:
    return handmade_router_bundle(tmp_path_factory.mktemp("router") / "bundle")


def test_predict_matches_torch_on_transformers_tokenization(handmade) -> None:
    transformers = pytest.importorskip("transformers")
    bundle, model = handmade
    session = RouterSession(bundle, providers=["cpu"])
    hf = transformers.AutoTokenizer.from_pretrained(str(bundle / "tokenizer"))
    enc = hf(PROMPTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    ids, mask = session.tokenize(PROMPTS)
    assert np.array_equal(ids, enc["input_ids"].numpy()) and np.array_equal(
        mask, enc["attention_mask"].numpy()
    )
    with torch.no_grad():
        want_prs, want_scores = model(enc["input_ids"], enc["attention_mask"])
    prs, scores = session.predict(PROMPTS)
    assert prs.shape == (3,) and scores.shape == (3, 3) and prs.dtype == np.float32
    assert np.abs(prs - want_prs.numpy()).max() <= 1e-5
    assert np.abs(scores - want_scores.numpy()).max() <= 1e-5
    # Batch rows equal single predictions (padding is masked out).
    for i, prompt in enumerate(PROMPTS):
        one_prs, one_scores = session.predict_one(prompt)
        assert isinstance(one_prs, float) and one_scores.shape == (3,)
        assert abs(one_prs - float(prs[i])) <= 1e-5
        assert np.abs(one_scores - scores[i]).max() <= 1e-5


def test_routing_and_session_reuse(handmade) -> None:
    bundle, _ = handmade
    session = RouterSession(bundle)
    assert session.routing["router_version"] == "test-1" and session.metrics == METRICS
    assert session.max_length == MAX_LENGTH and session.providers[-1] == "CPUExecutionProvider"
    ort_session = session.model.session
    session.predict_one("a")
    session.predict(["b", "c"])
    assert session.model.session is ort_session


def test_long_prompt_truncated_with_warning(handmade, caplog) -> None:
    bundle, _ = handmade
    session = RouterSession(bundle)
    long_prompt = " ".join(["castle"] * 100)
    with caplog.at_level(logging.WARNING, logger="routet2i.router_runtime"):
        ids, _ = session.tokenize([long_prompt, "short"])
    assert ids.shape == (2, MAX_LENGTH)
    assert ids[0, -1] == session.tokenizer.token_to_id("[SEP]")  # the special token survives truncation
    assert any("max_length of 24" in r.message for r in caplog.records)
    assert np.isfinite(session.predict_one(long_prompt)[0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s: s.predict("one string"), "prompts='one string'"),
        (lambda s: s.predict([]), r"prompts=\[\]"),
        (lambda s: s.predict(["ok", ""]), r"prompts\[1\]=''"),
        (lambda s: s.predict(["ok", None]), r"prompts\[1\]=None"),
        (lambda s: s.predict_one("  "), "prompt='  '"),
    ],
)
def test_bad_input(handmade, call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call(RouterSession(handmade[0]))


def test_tampered_missing_and_wrong_kind(handmade, tmp_path) -> None:
    bundle = tmp_path / "router"
    shutil.copytree(handmade[0], bundle)
    routing = bundle / "routing.json"
    routing.write_text(routing.read_text().replace('"alpha": 0.4', '"alpha": 0.9'))
    with pytest.raises(BundleError, match=r"routing.json.*(sha256|size)"):
        RouterSession(bundle)
    (bundle / "router.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="router.onnx"):
        RouterSession(bundle)
    shutil.rmtree(bundle)
    shutil.copytree(handmade[0], bundle)
    write_manifest(bundle, kind="edge")
    with pytest.raises(BundleError, match="expected 'router'"):
        RouterSession(bundle)


def test_bad_routing_json(handmade, tmp_path) -> None:
    bundle = tmp_path / "router"
    shutil.copytree(handmade[0], bundle)
    routing = json.loads((bundle / "routing.json").read_text())
    del routing["max_length"]
    (bundle / "routing.json").write_text(json.dumps(routing))
    write_manifest(bundle, kind="router")
    with pytest.raises(BundleError, match=r"routing.json: missing keys \['max_length'\]"):
        RouterSession(bundle)
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    write_manifest(bundle, kind="router")
    with pytest.raises(BundleFileMissing, match="tokenizer/tokenizer.json"):
        RouterSession(bundle)


def test_metric_count_mismatch_is_reported(handmade, tmp_path) -> None:
    bundle = tmp_path / "router"
    shutil.copytree(handmade[0], bundle)
    routing = json.loads((bundle / "routing.json").read_text())
    routing["metrics"] = ["only_one"]
    (bundle / "routing.json").write_text(json.dumps(routing))
    write_manifest(bundle, kind="router")
    with pytest.raises(BundleError, match=r"metric_scores shape \(1, 3\).*1 metrics"):
        RouterSession(bundle).predict_one("a fox")


# ------------------------------------------------------------------------ the real `routet2i export router`


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A router trained for a few epochs on a small synthetic table, through `routet2i export router`."""
    import random

    from routet2i.training.cli import main

    work = tmp_path_factory.mktemp("router-export")
    rng = random.Random(0)
    rows = ["dataset,prompt_id,prompt,model,metric,value,n"]
    prompts = [f"{adj} {noun} in a {place}" for adj in ("red", "tiny", "old") for noun in ("fox", "car", "tree")
               for place in ("city", "forest")]  # fmt: skip
    for i, prompt in enumerate(prompts):
        for model in ("edge", "cloud"):
            for metric in ("m1", "m2"):
                rows.append(f'demo,p{i},"{prompt}",{model},{metric},{rng.random():.4f},1')
    table = work / "q.csv"
    table.write_text("\n".join(rows) + "\n")
    ckpt, bundle = work / "ckpt", work / "bundle"
    assert main(["train", "--table", str(table), "--dataset", "demo", "--edge-model", "edge",
                 "--cloud-model", "cloud", "--out", str(ckpt), "--epochs", "1"]) == 0  # fmt: skip
    assert main(["export", "router", "--router", str(ckpt), "--out", str(bundle)]) == 0
    return bundle


def test_exported_bundle_on_real_prompts(exported, prompts_dir) -> None:
    session = RouterSession(exported)
    for key in ("format_version", "method", "metrics", "weights", "gamma", "calibration", "max_length"):
        assert key in session.routing, key
    rows = (prompts_dir / "parti" / "PartiPrompts.tsv").read_text().splitlines()[1:17]
    prompts = [r.split("\t")[0] for r in rows]
    prs, scores = session.predict(prompts)
    assert prs.shape == (16,) and scores.shape == (16, len(session.metrics))
    assert np.isfinite(prs).all() and np.isfinite(scores).all()
    assert float(prs.std()) > 0  # different prompts, different predictions
    one, _ = session.predict_one(prompts[3])
    assert abs(one - float(prs[3])) <= 1e-5


def test_router_session_defaults_to_one_intra_op_thread(handmade) -> None:
    from routet2i.ort import SessionConfig

    bundle, _ = handmade
    assert RouterSession(bundle).model.config.intra_op_threads == 1
    session = RouterSession(bundle, session_config=SessionConfig(intra_op_threads=0))
    assert session.model.config.intra_op_threads == 0
    assert session.model.session.get_session_options().intra_op_num_threads == 0
