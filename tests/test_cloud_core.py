"""The transport-free core, driven directly with asyncio (no gRPC): defaults, bounds, charging rule."""

from __future__ import annotations

import asyncio

import pytest
from routet2i.cloud_server import CloudCore, GenerateInput, NoOpPipeline, ServerConfig, open_store
from routet2i.cloud_server.core import validate
from routet2i.cloud_server.errors import InvalidArgument, NotReady, QuotaExhausted, Unauthenticated


def test_validate_resolves_server_defaults():
    cfg = ServerConfig(default_steps=12, default_guidance=4.5, default_width=96)
    p = validate(GenerateInput(request_id="", prompt="a fox"), cfg, NoOpPipeline())
    assert (p.width, p.height, p.steps, p.guidance) == (96, 64, 12, 4.5)  # height: the model's native 64
    p = validate(GenerateInput(request_id="", prompt="a fox", num_inference_steps=3, guidance_scale=0.0), cfg,
                 NoOpPipeline())  # fmt: skip
    assert (p.steps, p.guidance) == (3, 0.0)  # an explicit 0 guidance is kept, not replaced by the default


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"width": 2056}, "width"),
        ({"max_size": 128, "width": 136}, "width"),
        ({"num_inference_steps": 7}, None),
    ],
)
def test_validate_bounds_follow_config_and_model(kw, field):
    cfg = ServerConfig(max_steps=6, default_steps=4, max_size=kw.pop("max_size", 2048))
    req = GenerateInput(request_id="", prompt="x", **kw)
    with pytest.raises(InvalidArgument) as e:
        validate(req, cfg, NoOpPipeline())
    assert e.value.field == (field or "num_inference_steps")


def test_core_charges_only_successes(sqlite_url):
    async def scenario():
        store = open_store(sqlite_url)
        token = store.add_device("d", quota=3, period="total")
        core = CloudCore(store, NoOpPipeline(), ServerConfig(default_steps=2, batch_window_s=0.0))
        with pytest.raises(NotReady):  # not started: the pipeline is not loaded yet
            await core.generate(token, GenerateInput(request_id="early", prompt="x"))
        await core.start()
        with pytest.raises(Unauthenticated):
            await core.generate(None, GenerateInput(request_id="a", prompt="x"))
        r = await core.generate(token, GenerateInput(request_id="a", prompt="x", seed=5))
        assert r.charged and r.seed == 5 and r.quota.used == 1 and r.image_png.startswith(b"\x89PNG")
        again = await core.generate(token, GenerateInput(request_id="a", prompt="x"))
        assert not again.charged and again.seed == 5 and again.image_png == r.image_png
        with pytest.raises(InvalidArgument):
            await core.generate(token, GenerateInput(request_id="b", prompt=""))
        # a request cancelled while queued behind a slow one is never charged
        core.pipeline.step_delay_s = 0.1
        first = asyncio.ensure_future(core.generate(token, GenerateInput(request_id="c", prompt="x")))
        second = asyncio.ensure_future(
            core.generate(token, GenerateInput(request_id="d", prompt="y", width=32))
        )
        while not core.batcher.running:
            await asyncio.sleep(0.005)
        second.cancel()
        assert (await first).quota.used == 2
        with pytest.raises(asyncio.CancelledError):
            await second
        await asyncio.sleep(0.2)
        snap = store.quota("d")
        assert (snap.used, snap.reserved) == (2, 0)
        core.pipeline.step_delay_s = 0.0
        assert (await core.generate(token, GenerateInput(request_id="e", prompt="x"))).quota.remaining == 0
        with pytest.raises(QuotaExhausted):
            await core.generate(token, GenerateInput(request_id="f", prompt="x"))
        await core.close()
        store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "kw, needle",
    [({"max_batch": 0}, "max_batch=0"), ({"batch_window_s": -1.0}, "batch_window_s=-1.0"),
     ({"default_steps": 200}, "above max_steps"), ({"default_guidance": float("nan")}, "default_guidance=nan"),
     ({"reservation_ttl_s": 0.0}, "reservation_ttl_s=0")],
)  # fmt: skip
def test_server_config_rejects_bad_values(kw, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        ServerConfig(**kw)
