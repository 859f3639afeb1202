"""routet2i: edge-cloud routing for text-to-image generation (RouteT2I).

The device side: importing this package never imports torch, transformers or diffusers, and opens no
file, network connection or client.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
