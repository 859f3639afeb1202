"""routet2i: edge-cloud routing for text-to-image generation (RouteT2I).

The device side: importing this package never imports torch, transformers or diffusers, and opens no
file, network connection or client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AsyncEdgeClient",
    "BundleError",
    "BundleFileMissing",
    "ClientConfig",
    "CloudConfig",
    "CloudError",
    "CloudRejected",
    "CloudRequest",
    "CloudResult",
    "CloudUnavailable",
    "EdgeClient",
    "GenerateResult",
    "GenerationCancelled",
    "GenerationConfig",
    "LogConfig",
    "PolicyConfig",
    "ProgressEvent",
    "QuotaExhausted",
    "RouteDecision",
    "UsageError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover
    from routet2i._errors import (
        BundleError,
        BundleFileMissing,
        CloudError,
        CloudRejected,
        CloudUnavailable,
        GenerationCancelled,
        QuotaExhausted,
        UsageError,
    )
    from routet2i.client import AsyncEdgeClient, EdgeClient, GenerateResult, RouteDecision
    from routet2i.cloud_client import CloudRequest, CloudResult
    from routet2i.config import ClientConfig, CloudConfig, GenerationConfig, LogConfig, PolicyConfig
    from routet2i.progress import ProgressEvent

# Exported lazily (PEP 562): `import routet2i` stays light; onnxruntime, grpc, PIL load on first use. The
# error types, the config sections and ProgressEvent import nothing heavy.
_LAZY = {
    "EdgeClient": "routet2i.client",
    "AsyncEdgeClient": "routet2i.client",
    "GenerateResult": "routet2i.client",
    "RouteDecision": "routet2i.client",
    "CloudRequest": "routet2i.cloud_client",
    "CloudResult": "routet2i.cloud_client",
    **{
        name: "routet2i.config"
        for name in ("ClientConfig", "CloudConfig", "GenerationConfig", "LogConfig", "PolicyConfig")
    },
    "ProgressEvent": "routet2i.progress",
    **{
        name: "routet2i._errors"
        for name in (
            "BundleError",
            "BundleFileMissing",
            "CloudError",
            "CloudRejected",
            "CloudUnavailable",
            "GenerationCancelled",
            "QuotaExhausted",
            "UsageError",
        )
    },
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'routet2i' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
