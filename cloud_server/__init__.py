"""routet2i cloud endpoint: serve SD3 pipelines over gRPC with per-device quotas in units.

Start a loopback server in-process (tests, the demo) and give a device a token::

    from routet2i.cloud_server import BackgroundServer, open_store

    store = open_store("sqlite:////tmp/quota.db")              # or "postgresql://user@host:5432/db"
    token = store.add_device("demo-device", quota=10, period="total")   # the token, shown only now
    with BackgroundServer(store, "/path/to/sd3-folder") as srv:        # or "noop"; binds 127.0.0.1:0
        address = srv.address                                          # "127.0.0.1:<port>"
        # clients send metadata ("authorization", f"Bearer {token}")
    # several models, one batcher each, the first the default; an image costs its model's units (default 1)
    with BackgroundServer(store, {"small": "/path/a", "large": "/path/b"}, costs={"large": 3}) as srv:
        ...                                                            # GenerateRequest.model = "large"

From asyncio code: ``server, port = await create_server(store, pipeline, "127.0.0.1:0")`` then
``await server.stop(grace)``. The command line is ``routet2i-cloud`` (`routet2i.cloud_server.cli`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackgroundServer",
    "CloudCore",
    "CloudServer",
    "GenerateInput",
    "GenerateResult",
    "NoOpPipeline",
    "QuotaStore",
    "STATUS_CODES",
    "ServerConfig",
    "TlsConfig",
    "create_server",
    "open_store",
]

_LAZY = {
    "BackgroundServer": "servicer",
    "CloudServer": "servicer",
    "STATUS_CODES": "servicer",
    "TlsConfig": "servicer",
    "create_server": "servicer",
    "CloudCore": "core",
    "GenerateInput": "core",
    "GenerateResult": "core",
    "ServerConfig": "core",
    "NoOpPipeline": "pipelines",
    "QuotaStore": "store",
    "open_store": "store",
}


def __getattr__(name: str) -> Any:  # lazy: `import routet2i.cloud_server` stays cheap (no grpc, no torch)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"routet2i.cloud_server.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
