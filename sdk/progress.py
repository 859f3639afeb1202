"""`ProgressEvent`: the one progress-callback argument of `EdgeClient.generate`, `AsyncEdgeClient.generate`
and `EdgePipeline.__call__` (``progress=lambda ev: ...``). Imports nothing heavy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ProgressCallback", "ProgressEvent"]


@dataclass
class ProgressEvent:
    """One progress report of a generation: an edge denoising step or a cloud stream event."""

    route: str  # "edge" | "cloud"
    step: int  # steps done so far (from 1)
    total_steps: int  # steps in this generation
    request_id: str = ""  # the generation this belongs to ("" for a bare EdgePipeline call)


ProgressCallback = Callable[[ProgressEvent], None]
