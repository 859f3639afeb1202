"""Contrastive CLIP metrics: the pairs table, q = sigmoid(s+ - s-) against CLIPModel's own logits, batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from routet2i._errors import UsageError
from routet2i.training.metrics import DEFAULT_PAIRS_FILE, ClipQualityScorer, MetricPair, load_metric_pairs

TEN = [
    "definition",
    "detail",
    "clarity",
    "sharpness",
    "harmony",
    "realism",
    "color",
    "consistency",
    "layout",
    "integrity",
]


def _images(n: int, seed: int = 0, side: int = 48) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (side, side + 8, 3), dtype=np.uint8)) for _ in range(n)]


def test_default_pairs_table() -> None:
    pairs = load_metric_pairs()
    assert [p.metric for p in pairs] == TEN
    assert (pairs[0].positive, pairs[0].negative) == ("High definition photo", "Low definition photo")
    assert all(p.positive != p.negative for p in pairs)
    assert len({p.positive for p in pairs}) == 10 and len({p.negative for p in pairs}) == 10
    assert DEFAULT_PAIRS_FILE.name == "metric_pairs.csv"


def test_custom_pairs_file(tmp_path: Path) -> None:
    p = tmp_path / "pairs.csv"
    p.write_text('# my pairs\nmetric,positive,negative\nbright,"Bright, sunny photo",Dark photo\n')
    assert load_metric_pairs(p) == [MetricPair("bright", "Bright, sunny photo", "Dark photo")]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("metric,positive\na,b\n", "missing column(s) negative"),
        ("metric,positive,negative\na,b,\n", "line 2 has an empty"),
        ("metric,positive,negative\na,b,c\na,d,e\n", "repeats metric(s) a"),
        ("metric,positive,negative\n", "has no pairs"),
    ],
)
def test_bad_pairs_files(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "pairs.csv"
    p.write_text(text)
    with pytest.raises(UsageError, match=None) as info:
        load_metric_pairs(p)
    assert needle in str(info.value)
    with pytest.raises(UsageError, match="does not exist"):
        load_metric_pairs(tmp_path / "absent.csv")


@pytest.fixture(scope="module")
def scorer(tiny_models: dict[str, Path]) -> ClipQualityScorer:
    return ClipQualityScorer(tiny_models["clip"], batch_size=4)


def test_matches_clip_logits(scorer: ClipQualityScorer, tiny_models: dict[str, Path]) -> None:
    import torch
    from transformers import CLIPModel, CLIPProcessor

    images = _images(3)
    q = scorer.score(images)
    assert q.shape == (3, 10) and scorer.metrics == TEN
    assert np.all((q > 0) & (q < 1))
    # Independent reference: CLIPModel.forward's logits_per_image = logit_scale.exp() * cosine.
    model = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_models["clip"])
    texts = [p.positive for p in scorer.pairs] + [p.negative for p in scorer.pairs]
    inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image.numpy()
    expected = 1 / (1 + np.exp(-(logits[:, :10] - logits[:, 10:])))
    np.testing.assert_allclose(q, expected, atol=1e-5)
    assert np.ptp(q, axis=0).max() > 1e-4  # different images get different scores


def test_batched_equals_one_by_one_and_text_cached(
    scorer: ClipQualityScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = _images(7, seed=1)
    scorer.text_embeddings()
    calls = []
    orig = scorer.model.get_text_features
    monkeypatch.setattr(scorer.model, "get_text_features", lambda *a, **k: calls.append(1) or orig(*a, **k))
    batched = scorer.score(images)  # batches of 4 + 3
    single = np.concatenate([scorer.score([im], batch_size=1) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert calls == []  # text embeddings were computed once, before, and reused


def test_swapped_pairs_give_one_minus_q(tiny_models: dict[str, Path], scorer: ClipQualityScorer) -> None:
    swapped = [MetricPair(p.metric, p.negative, p.positive) for p in scorer.pairs[:3]]
    other = ClipQualityScorer(tiny_models["clip"], pairs=swapped)
    images = _images(2, seed=2)
    np.testing.assert_allclose(other.score(images), 1 - scorer.score(images)[:, :3], atol=1e-5)


def test_bad_clip_and_batch_size(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    with pytest.raises(UsageError, match="--clip"):
        ClipQualityScorer(tmp_path / "no-such-clip")
    with pytest.raises(UsageError, match="batch_size"):
        ClipQualityScorer(tiny_models["clip"], batch_size=0)
