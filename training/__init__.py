"""routet2i's workstation side (torch): quality data, labels, training, evaluation, the demo.

The Python API of the training CLI: `train_router` and `export_router` (`routet2i.training.api`; README,
section Training). Loaded on first use, so ``import routet2i.training`` stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_router", "train_router"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from routet2i.training import api

        return getattr(api, name)
    raise AttributeError(f"module 'routet2i.training' has no attribute {name!r}")
