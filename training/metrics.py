"""Contrastive CLIP quality metrics (ROUTET2I.md section 1).

For an image I and a text pair m = (m+, m-):  q(I, m) = sigmoid(s(I, m+) - s(I, m-)), with s the CLIP
image-text logit (``logit_scale.exp() * cosine``). q is in (0, 1), higher is better.

The pairs live in ONE editable table, ``metric_pairs.csv`` beside this module (columns
``metric,positive,negative``; lines starting with ``#`` are comments). Only the first pair ("High definition
photo" / "Low definition photo", the paper's Definition) is published; the other nine (detail, clarity,
sharpness, harmony, realism, color, consistency, layout, integrity) are ours, written in the same spirit.
Pass your own file (same columns) to use other pairs.

:class:`ClipQualityScorer` loads any CLIP (``CLIPModel`` + its processor) by Hugging Face id or folder,
computes the 2N text embeddings once and caches them, and scores images in batches on the best available
device (CUDA, then Apple MPS, then CPU) — one CLIP image pass per batch for all N metrics.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from routet2i._errors import UsageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PAIRS_FILE",
    "ClipQualityScorer",
    "MetricPair",
    "best_device",
    "load_metric_pairs",
]

DEFAULT_PAIRS_FILE = Path(__file__).with_name("metric_pairs.csv")
_PAIR_COLUMNS = ("metric", "positive", "negative")


@dataclass(frozen=True)
class MetricPair:
    """One quality dimension: its name in the quality table and its contrastive text pair."""

    metric: str  # metric name written to the table (the labels get a D_<metric> column)
    positive: str  # m+: text describing a good image on this dimension
    negative: str  # m-: text describing a bad image on this dimension


def load_metric_pairs(path: str | os.PathLike[str] | None = None) -> list[MetricPair]:
    """Read a pairs table (CSV with ``metric,positive,negative``); default: the shipped ten pairs."""
    p = Path(path) if path is not None else DEFAULT_PAIRS_FILE
    if not p.is_file():
        raise UsageError(f"metric pairs file {str(p)!r} does not exist (columns: {','.join(_PAIR_COLUMNS)})")
    with open(p, newline="", encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and not line.lstrip().startswith("#")]
    reader = csv.DictReader(lines)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in _PAIR_COLUMNS if c not in header]
    if missing:
        raise UsageError(
            f"metric pairs file {str(p)!r}: missing column(s) {', '.join(missing)} (found: {','.join(header)})"
        )
    pairs: list[MetricPair] = []
    for i, row in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not all(row.get(c) for c in _PAIR_COLUMNS):
            raise UsageError(
                f"metric pairs file {str(p)!r}: line {i} has an empty metric, positive or negative text"
            )
        if "," in row["metric"]:
            raise UsageError(
                f"metric pairs file {str(p)!r}: metric name {row['metric']!r} may not contain a comma"
            )
        pairs.append(MetricPair(row["metric"], row["positive"], row["negative"]))
    if not pairs:
        raise UsageError(f"metric pairs file {str(p)!r} has no pairs")
    names = [m.metric for m in pairs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise UsageError(f"metric pairs file {str(p)!r} repeats metric(s) {', '.join(dups)}")
    return pairs


def best_device() -> str:
    """'cuda' if available, else 'mps', else 'cpu'."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _resolve_pairs(pairs: Sequence[MetricPair] | str | os.PathLike[str] | None) -> list[MetricPair]:
    if pairs is None or isinstance(pairs, (str, os.PathLike)):
        return load_metric_pairs(pairs)
    out = list(pairs)
    if not out or not all(isinstance(p, MetricPair) for p in out):
        raise UsageError("pairs must be a pairs file path or a non-empty list of MetricPair")
    return out


class ClipQualityScorer:
    """Scores images on the N contrastive metrics with one CLIP model.

    ``clip``: a Hugging Face id or a folder holding a ``CLIPModel`` and its processor.
    ``pairs``: a pairs file, a list of :class:`MetricPair`, or None for the shipped ten.
    ``device``: torch device (default :func:`best_device`); ``dtype``: default float16 on CUDA, else float32.
    ``batch_size``: images per CLIP call in :meth:`score`.
    """

    def __init__(
        self,
        clip: str | os.PathLike[str],
        pairs: Sequence[MetricPair] | str | os.PathLike[str] | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
    ) -> None:
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        name = str(clip)
        try:
            model = CLIPModel.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
            # the slow (PIL) processor: the fast one needs torchvision and gives slightly different pixels
            image_processor = AutoImageProcessor.from_pretrained(name, use_fast=False)
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"--clip {name!r}: cannot load a CLIP model and processor: {str(exc).splitlines()[0]}"
            ) from exc
        self._setup(model, tokenizer, image_processor, pairs, device, dtype, batch_size, name)

    @classmethod
    def from_components(
        cls,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        pairs: Sequence[MetricPair] | str | os.PathLike[str] | None = None,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 32,
        name: str = "clip",
    ) -> ClipQualityScorer:
        """A scorer over an already built ``CLIPModel``, tokenizer and image processor."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, image_processor, pairs, device, dtype, batch_size, name)
        return self

    def _setup(self, model, tokenizer, image_processor, pairs, device, dtype, batch_size, name) -> None:
        import torch

        if int(batch_size) < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.pairs = _resolve_pairs(pairs)
        self.device = torch.device(device or best_device())
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise UsageError(f"dtype {dtype!r} is not a torch dtype (float32, float16, bfloat16)")
            dtype = getattr(torch, dtype)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._text: torch.Tensor | None = None  # [2N, d] normalized text embeddings, computed once

    @property
    def metrics(self) -> list[str]:
        """Metric names, the column order of :meth:`score`."""
        return [p.metric for p in self.pairs]

    def text_embeddings(self) -> torch.Tensor:
        """[2N, d] L2-normalized embeddings of [m+_1..m+_N, m-_1..m-_N]; computed on first use, then cached."""
        import torch

        if self._text is None:
            texts = [p.positive for p in self.pairs] + [p.negative for p in self.pairs]
            max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
            tok = self.tokenizer(
                texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt"
            )
            with torch.inference_mode():
                emb = self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device),
                    attention_mask=tok["attention_mask"].to(self.device),
                )
            self._text = emb / emb.norm(dim=-1, keepdim=True)
            logger.debug("cached %d text embeddings for %s", len(texts), self.name)
        return self._text

    def _score_batch(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        text = self.text_embeddings()
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            img = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            img = img / img.norm(dim=-1, keepdim=True)
            logits = self.model.logit_scale.exp() * (img @ text.T)  # [b, 2N]: s(I, m)
            n = len(self.pairs)
            q = torch.sigmoid((logits[:, :n] - logits[:, n:]).float())
        return q.cpu().numpy().astype(np.float64)

    def score(self, images: Sequence[Any], batch_size: int | None = None) -> np.ndarray:
        """[len(images), N] contrastive qualities in (0, 1) of PIL images (or HWC uint8 arrays)."""
        images = list(images)
        if not images:
            return np.zeros((0, len(self.pairs)))
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        parts = [self._score_batch(images[i : i + bs]) for i in range(0, len(images), bs)]
        return np.concatenate(parts, axis=0)
