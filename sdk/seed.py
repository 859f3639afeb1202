"""The one seed bound of routet2i: a seed is an integer in [0, 2**64 - 1], the range of the wire's ``uint64``
(``GenerateRequest.seed`` / ``GenerateResponse.seed``). `EdgeClient.generate`, `EdgePipeline` and the cloud
server accept exactly this range, so a seed the cloud returned can be replayed on the edge and the other way
round; `EdgeClient` draws its own seeds from the whole range, as the server does. Torch-free.
"""

from __future__ import annotations

import numbers
from typing import Any

from routet2i._errors import UsageError

__all__ = ["SEED_MAX", "check_seed"]

SEED_MAX = 2**64 - 1  # uint64


def check_seed(seed: Any, name: str = "seed") -> int | None:
    """``seed`` as an int, None kept; `UsageError` naming ``name`` for anything outside [0, SEED_MAX]."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"{name}={seed!r}: must be an integer in [0, 2**64 - 1] (uint64)")
    return int(seed)
