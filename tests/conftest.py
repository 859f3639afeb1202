"""Shared fixtures: tiny random-weight models of the real architectures, built once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ROUTET2I_SHARED_DATA", REPO.parent / "shared" / "data"))
QUALITY_CSV = SHARED_DATA / "quality" / "public_quality_long.csv"
PROMPTS_DIR = SHARED_DATA / "prompts"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"edge-sd21": Path, "cloud-sd3": Path, "clip": Path}: built offline with fixed seeds."""
    from routet2i.training.tiny_models import build_tiny_models

    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def quality_csv() -> Path:
    """The real public quality table from ../shared/data; tests that need it skip when it is absent."""
    if not QUALITY_CSV.exists():
        pytest.skip(
            f"public quality data not found at {QUALITY_CSV} (../shared/data is not part of the repo)"
        )
    return QUALITY_CSV


@pytest.fixture(scope="session")
def prompts_dir() -> Path:
    if not PROMPTS_DIR.exists():
        pytest.skip(f"prompt corpora not found at {PROMPTS_DIR} (../shared/data is not part of the repo)")
    return PROMPTS_DIR
