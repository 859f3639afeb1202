"""What users expect of an image API (issue 16 item 5): ``result.save`` (PNG text metadata, JPEG/WebP by
extension, the prompt unless privacy says no), ``num_images_per_prompt`` (edge and cloud), the scheduler
in the config, and ``result.model`` from the edge bundle. Fake edge/cloud where the models do not matter;
the tiny SD2.1 edge bundle where they do."""

from __future__ import annotations

import io
import json
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from routet2i import EdgeClient, UsageError
from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc
from routet2i.config import ClientConfig, load_config
from routet2i.seed import SEED_MAX


class FakeEdge:
    """An EdgePipeline stand-in: the image's colour encodes its seed, so tests can tell images apart."""

    model_name = "acme/sd-tiny"

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, *, seed=None, num_images_per_prompt=None, **kwargs):
        self.calls.append({"seed": seed, "n": num_images_per_prompt, **kwargs})
        make = lambda k: Image.new("RGB", (8, 8), ((seed + k) % 256, 0, 0))  # noqa: E731
        return make(0) if num_images_per_prompt is None else [make(k) for k in range(num_images_per_prompt)]


class FakeCloud(cloud_pb2_grpc.CloudGenerationServicer):
    def __init__(self, fail_on_call=None):
        self.requests = []
        self.fail_on_call = fail_on_call

    def Generate(self, request, context):
        self.requests.append(request)
        if self.fail_on_call == len(self.requests):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad size")
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (0, 0, request.seed % 256)).save(buf, format="PNG")
        return cloud_pb2.GenerateResponse(image_png=buf.getvalue(), width=16, height=16, model="fake-sd3",
                                          seed=request.seed)  # fmt: skip

    def GenerateStream(self, request, context):
        yield cloud_pb2.GenerateEvent(result=self.Generate(request, context))

    def GetQuota(self, request, context):
        return cloud_pb2.QuotaStatus(device_id="d", limit=10, used=0, remaining=10, period="day")


@pytest.fixture
def fake_cloud(request):
    servicer = FakeCloud(getattr(request, "param", None))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    cloud_pb2_grpc.add_CloudGenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


class _Client(EdgeClient):
    """No router here: generate on the edge unless told otherwise."""

    def generate(self, prompt, **kw):
        kw.setdefault("force", "edge")
        return super().generate(prompt, **kw)


def _client(edge=None, **kw):
    return _Client(edge=edge or FakeEdge(), state_file="", decision_log="", **kw)


# ------------------------------------------------------------------------------------------ result.save


def test_save_png_has_text_metadata_with_the_prompt(tmp_path):
    r = _client().generate("a red fox", seed=7)
    out = r.save(tmp_path / "fox.png")
    img = Image.open(out)
    assert img.format == "PNG"
    meta = img.text
    assert (meta["seed"], meta["route"], meta["model"], meta["prompt"]) == (
        "7",
        "edge",
        "acme/sd-tiny",
        "a red fox",
    )
    assert meta["prs"] == "" and meta["alpha"] == ""  # no router: no PRS^, no alpha
    assert meta["software"].startswith("routet2i ")
    assert [p.name for p in tmp_path.iterdir()] == ["fox.png"]  # no temporary file left behind


def test_save_png_writes_prs_and_alpha_when_routed(tmp_path):
    class Router:
        routing = {"edge_model": "sd21", "cloud_model": "sd3", "calibration": [{"rate": 0.3, "alpha": 0.4}]}

        def predict_one(self, prompt):
            return 0.75, [0.7, 0.8]

    client = EdgeClient(
        router=Router(), edge=FakeEdge(), state_file="", decision_log="", target_cloud_rate=0.3
    )
    r = client.generate("a fox", seed=1)
    meta = Image.open(r.save(tmp_path / "x.png")).text
    assert (float(meta["prs"]), float(meta["alpha"]), meta["reason"]) == (0.75, 0.4, "router")


@pytest.mark.parametrize("save_prompt, local_only, has_prompt", [(True, False, True), (False, False, False),
                                                                  (True, True, False)])  # fmt: skip
def test_privacy_keeps_the_prompt_out(tmp_path, save_prompt, local_only, has_prompt):
    r = _client(save_prompt=save_prompt).generate("my passport photo", seed=1, local_only=local_only)
    meta = Image.open(r.save(tmp_path / "x.png")).text
    assert ("prompt" in meta) == has_prompt and (r.prompt is not None) == has_prompt
    assert "prompt" not in r.to_dict() and "images" not in r.to_dict()


def test_save_prompt_from_toml_and_bad_value(tmp_path):
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text("[log]\nsave_prompt = false\n")
    assert load_config(cfg, environ={}).save_prompt is False
    with pytest.raises(UsageError, match="save_prompt"):
        ClientConfig(save_prompt="no")


@pytest.mark.parametrize("name, fmt", [("x.jpg", "JPEG"), ("x.JPEG", "JPEG"), ("x.webp", "WEBP")])
def test_save_jpeg_webp_by_extension_with_exif_metadata(tmp_path, name, fmt):
    r = _client().generate("a fox", seed=3)
    img = Image.open(r.save(tmp_path / name))
    assert img.format == fmt
    meta = json.loads(img.getexif()[0x010E])
    assert (meta["seed"], meta["prompt"], meta["model"]) == ("3", "a fox", "acme/sd-tiny")


@pytest.mark.parametrize("name", ["x.gif", "x", "x.png.tmp"])
def test_save_unknown_extension_names_the_allowed_ones(tmp_path, name):
    r = _client().generate("a fox", seed=3)
    with pytest.raises(UsageError, match=r"allowed: \.png, \.jpg, \.jpeg, \.webp"):
        r.save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_save_failure_leaves_the_old_file(tmp_path, monkeypatch):
    r = _client().generate("a fox", seed=3)
    out = tmp_path / "x.png"
    out.write_bytes(b"old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        r.save(out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.png"]


# ------------------------------------------------------------------------------ num_images_per_prompt


def test_num_images_on_the_edge_seeds_and_save_index(tmp_path):
    edge = FakeEdge()
    r = _client(edge).generate("a fox", seed=10, num_images_per_prompt=3)
    assert edge.calls[-1]["n"] == 3 and edge.calls[-1]["seed"] == 10
    assert r.seeds == [10, 11, 12] and r.seed == 10 and len(r.images) == 3 and r.image is r.images[0]
    assert [im.getpixel((0, 0))[0] for im in r.images] == [10, 11, 12]
    assert Image.open(r.save(tmp_path / "b.png", index=2)).text["seed"] == "12"
    with pytest.raises(UsageError, match="index"):
        r.save(tmp_path / "c.png", index=3)
    one = _client(edge).generate("a fox", seed=10)
    assert edge.calls[-1]["n"] is None and one.images == [one.image] and one.seeds == [10]


def test_num_images_seeds_wrap_at_the_bound():
    r = _client().generate("a fox", seed=SEED_MAX, num_images_per_prompt=2)
    assert r.seeds == [SEED_MAX, 0]


@pytest.mark.parametrize("n", [0, 65, 1.5, True, "2"])
def test_num_images_bad_value(n):
    with pytest.raises(UsageError, match="num_images_per_prompt"):
        _client().generate("a fox", num_images_per_prompt=n)


def test_num_images_in_the_cloud_one_request_each(fake_cloud):
    servicer, address = fake_cloud
    r = _client(cloud=address, token="t").generate("a fox", seed=5, force="cloud", num_images_per_prompt=3)
    assert (r.route, r.model, r.seeds) == ("cloud", "fake-sd3", [5, 6, 7])
    assert [q.seed for q in servicer.requests] == [5, 6, 7]
    ids = [q.request_id for q in servicer.requests]
    assert len(set(ids)) == 3 and ids[0] == r.request_id and ids[1] == f"{r.request_id}-1"
    assert [im.getpixel((0, 0))[2] for im in r.images] == [5, 6, 7]


@pytest.mark.parametrize("fake_cloud", [2], indirect=True)
def test_num_images_cloud_failure_moves_the_whole_batch_to_the_edge(fake_cloud):
    servicer, address = fake_cloud
    r = _client(cloud=address, token="t").generate("a fox", seed=5, force="cloud", num_images_per_prompt=3)
    assert (r.route, r.model, r.seeds, len(r.images)) == ("edge", "acme/sd-tiny", [5, 6, 7], 3)
    assert "image 2 of 3" in r.cloud_error and "bad size" in r.cloud_error


# ---------------------------------------------------------------------------------------- scheduler


@pytest.mark.parametrize("name, stored", [("dpm++", "dpm++"), ("DDIM", "ddim"), ("euler", "euler"),
                                          ("pndm", "pndm"), ("pnm", "pndm")])  # fmt: skip
def test_scheduler_in_config(tmp_path, name, stored):
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text(f'[generation]\nscheduler = "{name}"\n')
    assert load_config(cfg, environ={}).scheduler == stored


def test_bad_scheduler_lists_the_allowed_ones(tmp_path):
    with pytest.raises(UsageError, match=r"scheduler='lms'.*allowed: dpm\+\+, ddim, euler, pndm"):
        ClientConfig(scheduler="lms")
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text('scheduler = "ddim"\n')  # also accepted at the top level
    assert load_config(cfg, environ={}).scheduler == "ddim"
    cfg.write_text('scheduler = "ddim"\n[generation]\nscheduler = "euler"\n')
    with pytest.raises(UsageError, match="scheduler given twice"):
        load_config(cfg, environ={})
    assert load_config(None, environ={"ROUTET2I_SCHEDULER": "euler"}).scheduler == "euler"
    with pytest.raises(UsageError, match="allowed: dpm"):
        load_config(None, environ={"ROUTET2I_SCHEDULER": "k-lms"})


def test_edge_generate_scheduler_flag_is_checked(tmp_path, capsys):
    from routet2i.cli import main

    cfg = tmp_path / "routet2i.toml"
    cfg.write_text("[policy]\ntarget_cloud_rate = 0.3\n")
    assert main(["a fox", "--scheduler", "lms", "--config", str(cfg), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "scheduler='lms'" in err and "allowed: dpm++" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------- the real bundle


@pytest.fixture(scope="module")
def edge_bundle(tiny_models) -> Path:
    from _device_bundles import edge_bundle_for

    return edge_bundle_for(tiny_models["edge-sd21"])


def test_model_name_comes_from_the_bundle(edge_bundle, tiny_models, tmp_path):
    client = _Client(edge=edge_bundle, scheduler="ddim", state_file="", decision_log="")
    assert type(client.edge.scheduler).__name__ == "DDIMScheduler"
    r = client.generate("a fox", seed=1, num_inference_steps=2, width=64, height=64)
    source = Path(tiny_models["edge-sd21"]).name  # exported from a local folder: its name
    assert r.model == client.edge.model_name == source != "edge"
    assert Image.open(r.save(tmp_path / "x.png")).text["model"] == source


def test_model_name_rules():
    from routet2i.edge_pipeline import _model_name

    root = Path("/b/edge")
    assert _model_name({"edge": {"source": "stabilityai/stable-diffusion-2-1-base"}}, {}, root) == (
        "stabilityai/stable-diffusion-2-1-base"
    )
    assert _model_name({"edge": {"source": "/models/my-sd21/"}}, {}, root) == "my-sd21"
    assert _model_name({}, {"_name_or_path": "./sd21"}, root) == "sd21"
    assert _model_name({}, {}, root) == "edge"


def test_pipeline_num_images_equal_single_runs_with_seed_plus_i(edge_bundle):
    from routet2i.edge_pipeline import EdgePipeline

    pipe = EdgePipeline(edge_bundle)
    kw = {"num_inference_steps": 2, "width": 64, "height": 64, "output_type": "np"}
    steps = []
    batch = pipe(
        "a fox", seed=4, num_images_per_prompt=2, callback=lambda s, t, *_: steps.append((s, t)), **kw
    )
    assert isinstance(batch, list) and len(batch) == 2
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    for k in range(2):
        np.testing.assert_array_equal(batch[k], pipe("a fox", seed=4 + k, **kw))
    assert not np.array_equal(batch[0], batch[1])
    assert len(pipe("a fox", seed=4, num_images_per_prompt=1, **kw)) == 1  # an int: a list
    with pytest.raises(UsageError, match="num_images_per_prompt"):
        pipe("a fox", num_images_per_prompt=0, **kw)
    with pytest.raises(UsageError, match="latents"):
        pipe("a fox", latents=np.zeros((1, 4, 8, 8), np.float32), num_images_per_prompt=2, **kw)
