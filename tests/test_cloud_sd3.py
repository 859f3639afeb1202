"""The endpoint hosting the tiny random-weight SD3 (the real StableDiffusion3Pipeline architecture)."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
from _cloud_helpers import auth, request, stub_for
from PIL import Image
from routet2i.cloud_server import BackgroundServer, ServerConfig, open_store
from routet2i.cloud_server.pipelines import SD3Pipeline


class Recording(SD3Pipeline):
    """The real SD3 pipeline, recording the batch size of each call."""

    calls: list[int]

    def generate(self, items, on_step):
        self.calls.append(len(items))
        return super().generate(items, on_step)


@pytest.fixture(scope="module")
def sd3_server(tiny_models, tmp_path_factory):
    pipe = Recording(str(tiny_models["cloud-sd3"]), torch_threads=1)
    pipe.calls = []
    store = open_store(f"sqlite:///{tmp_path_factory.mktemp('sd3') / 'q.db'}")
    token = store.add_device("sd3-dev", quota=100, period="total")
    srv = BackgroundServer(store, pipe, config=ServerConfig(default_steps=2, max_batch=4, batch_window_s=0.3))
    channel, stub = stub_for(srv.address)
    yield srv, stub, token, pipe
    channel.close()
    srv.stop(1.0)
    store.close()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_sd3_generates_deterministic_images_per_seed(sd3_server):
    srv, stub, token, pipe = sd3_server
    a = stub.Generate(request("a red fox", request_id="a", seed=3), metadata=auth(token), timeout=120)
    b = stub.Generate(request("a red fox", request_id="b", seed=3), metadata=auth(token), timeout=120)
    c = stub.Generate(request("a red fox", request_id="c", seed=4), metadata=auth(token), timeout=120)
    assert (a.width, a.height) == (pipe.default_size, pipe.default_size) and a.model == "cloud-sd3"
    assert _pixels(a.image_png).shape == (pipe.default_size, pipe.default_size, 3)
    assert np.array_equal(_pixels(a.image_png), _pixels(b.image_png))
    assert np.abs(_pixels(a.image_png) - _pixels(c.image_png)).max() > 10
    assert c.quota.used == 3


def test_sd3_stream_reports_every_denoising_step(sd3_server):
    srv, stub, token, pipe = sd3_server
    events = list(
        stub.GenerateStream(request(num_inference_steps=3, seed=1), metadata=auth(token), timeout=120)
    )
    assert [(e.progress.step, e.progress.total_steps) for e in events[:-1]] == [(1, 3), (2, 3), (3, 3)]
    assert events[-1].result.image_png.startswith(b"\x89PNG")


def test_sd3_concurrent_requests_are_batched_and_keep_their_seeds(sd3_server):
    srv, stub, token, pipe = sd3_server
    prompts = ["a cat", "a lighthouse at night", "a bowl of fruit"]
    alone = [stub.Generate(request(p, seed=10 + i, guidance_scale=3.0), metadata=auth(token), timeout=120)
             for i, p in enumerate(prompts)]  # fmt: skip
    pipe.calls.clear()
    futures = [stub.Generate.future(request(p, seed=10 + i, guidance_scale=3.0), metadata=auth(token), timeout=120)
               for i, p in enumerate(prompts)]  # fmt: skip
    together = [f.result() for f in futures]
    assert pipe.calls == [3]  # one pipeline call for the three
    for x, y in zip(alone, together, strict=True):
        assert x.seed == y.seed
        assert np.abs(_pixels(x.image_png) - _pixels(y.image_png)).max() <= 2  # same image, batched or not


def test_sd3_sizes_follow_the_model(sd3_server):
    srv, stub, token, pipe = sd3_server
    assert pipe.size_multiple == 16  # VAE factor x patch size
    for fields, needle in [
        ({"width": 40}, "multiple of 16"),
        ({"height": pipe.max_size + 16}, "height"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(**fields), metadata=auth(token), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
    r = stub.Generate(request(width=32, height=48, seed=0), metadata=auth(token), timeout=120)
    assert _pixels(r.image_png).shape == (48, 32, 3)


def test_two_sd3_pipelines_each_charge_their_units(tiny_models, sd3_server, tmp_path):
    """Two tiny SD3 pipelines served as two models (issue 14): each request goes to its model's pipeline
    and takes that model's cost from the quota. The first model is the module server's already loaded
    pipeline (one load fewer; that server is idle meanwhile), the second a fresh load of the same folder."""
    _, _, _, loaded = sd3_server
    other = Recording(str(tiny_models["cloud-sd3"]), torch_threads=1)
    other.calls = []
    loaded.calls.clear()
    store = open_store(f"sqlite:///{tmp_path / 'q.db'}")
    token = store.add_device("two", quota=4, period="total")
    cfg = ServerConfig(default_steps=1, batch_window_s=0.0)
    with BackgroundServer(store, {"tier1": loaded, "tier2": other}, config=cfg, costs={"tier2": 3}) as srv:
        channel, stub = stub_for(srv.address)
        a = stub.Generate(request("a fox", seed=1, width=32, height=32), metadata=auth(token), timeout=120)
        b = stub.Generate(
            request("a fox", seed=1, width=32, height=32, model="tier2"), metadata=auth(token), timeout=120
        )
        assert (a.model, a.units_charged, a.quota.used) == ("tier1", 1, 1)
        assert (b.model, b.units_charged, b.quota.used) == ("tier2", 3, 4)
        assert (loaded.calls, other.calls) == ([1], [1])
        assert _pixels(b.image_png).shape == (32, 32, 3)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request("x", model="tier2"), metadata=auth(token), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "costs 3 units" in e.value.details()
        channel.close()
    store.close()
