"""Noun counting for the paper's complexity insight (more nouns: the cloud model wins more often).

The tagger is textblob's ``PatternTagger``: its lexicon ships inside the textblob wheel, so it works offline
with nothing to download (NLTK's default perceptron tagger would need ``nltk.download``). A noun is a token
tagged NN, NNS, NNP or NNPS; every occurrence counts ("two dogs and a dog" has 2 nouns; "coffee cup" has 2).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["NOUN_TAGS", "count_nouns", "nouns"]

NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})


@functools.lru_cache(maxsize=1)
def _tagger():
    try:
        from textblob.en.taggers import PatternTagger
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("noun counting needs textblob: pip install 'routet2i[train]'") from exc
    return PatternTagger()


def nouns(prompt: str) -> list[str]:
    """The noun tokens of one prompt, in order."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return [word for word, tag in _tagger().tag(prompt) if tag in NOUN_TAGS]


def count_nouns(prompts: Iterable[str]) -> np.ndarray:
    """[n] int64: number of noun tokens in each prompt."""
    if isinstance(prompts, str):
        raise TypeError("count_nouns takes a list of prompts, not one str (use nouns(prompt))")
    return np.array([len(nouns(p)) for p in prompts], dtype=np.int64)
