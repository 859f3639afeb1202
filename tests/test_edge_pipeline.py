"""The torch-free ONNX edge pipeline on the tiny SD2.1 bundle: parity with optimum's
ORTStableDiffusionPipeline on the same initial latents, tokenizer parity with CLIPTokenizer, bad input,
tampered bundles, providers."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from _device_bundles import edge_bundle_for
from routet2i._errors import BundleError, BundleFileMissing
from routet2i.edge_pipeline import EdgePipeline, SizeRule, load_clip_tokenizer
from routet2i.ort import OrtModel, SessionConfig, available_providers, resolve_providers

STEPS = 4
PROMPTS = ["a red fox in the snow", "An astronaut riding a horse, oil painting!", "café 3 cats"]


@pytest.fixture(scope="session")
def edge_bundle(tiny_models) -> Path:
    """The tiny SD2.1 pipeline through `routet2i export edge` (optimum-onnx layout + manifest)."""
    return edge_bundle_for(tiny_models["edge-sd21"])


@pytest.fixture(scope="module")
def pipe(edge_bundle) -> EdgePipeline:
    return EdgePipeline(edge_bundle, providers=["cpu"])


@pytest.fixture(scope="module")
def optimum_pipe(edge_bundle):
    ort_mod = pytest.importorskip("optimum.onnxruntime")
    return ort_mod.ORTStableDiffusionPipeline.from_pretrained(
        str(edge_bundle), provider="CPUExecutionProvider"
    )


def _latents(seed: int, pipe: EdgePipeline, size: int) -> np.ndarray:
    f = pipe.vae_scale_factor
    return np.random.default_rng(seed).standard_normal((1, 4, size // f, size // f), dtype=np.float32)


@pytest.mark.parametrize(
    "scheduler, diffusers_class",
    [
        (None, None),
        ("euler", "EulerDiscreteScheduler"),
        ("dpm++", "DPMSolverMultistepScheduler"),
        ("pndm", "PNDMScheduler"),
    ],
)
def test_parity_with_optimum_ort_pipeline(
    pipe, optimum_pipe, edge_bundle, scheduler, diffusers_class
) -> None:
    """Same bundle, same initial latents: whole image max abs diff <= 1e-3 (CFG on, negative prompt)."""
    import diffusers
    import torch

    ours = pipe if scheduler is None else EdgePipeline(edge_bundle, providers=["cpu"], scheduler=scheduler)
    reference_scheduler = optimum_pipe.scheduler
    if diffusers_class is not None:
        optimum_pipe.scheduler = getattr(diffusers, diffusers_class).from_config(reference_scheduler.config)
    try:
        for i, (prompt, negative) in enumerate([(PROMPTS[0], None), (PROMPTS[1], "blurry, low quality")]):
            size = 64 if i == 0 else 128
            latents = _latents(i, pipe, size)
            got = ours(
                prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
                width=size, height=size, latents=latents, output_type="np",
            )  # fmt: skip
            want = optimum_pipe(
                prompt, negative_prompt=negative, num_inference_steps=STEPS, guidance_scale=7.5,
                width=size, height=size, latents=torch.from_numpy(latents), output_type="np",
            ).images[0]  # fmt: skip
            assert got.shape == want.shape == (size, size, 3)
            diff = float(np.abs(got - want).max())
            assert diff <= 1e-3, f"{scheduler or 'bundle scheduler'} {size}px: max abs diff {diff}"
            assert float(got.std()) > 1e-3  # a real image, not a constant
    finally:
        optimum_pipe.scheduler = reference_scheduler


def test_parity_without_guidance(pipe, optimum_pipe) -> None:
    import torch

    latents = _latents(3, pipe, 64)
    got = pipe(PROMPTS[2], num_inference_steps=3, guidance_scale=1.0, latents=latents, output_type="np")
    want = optimum_pipe(
        PROMPTS[2],
        num_inference_steps=3,
        guidance_scale=1.0,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images[0]
    assert float(np.abs(got - want).max()) <= 1e-3


def test_tokenizer_matches_clip_tokenizer(edge_bundle, tmp_path) -> None:
    """tokenizer.json and, without it, vocab.json + merges.txt give CLIPTokenizer's ids (padded, truncated)."""
    transformers = pytest.importorskip("transformers")
    slow = transformers.CLIPTokenizer.from_pretrained(str(edge_bundle / "tokenizer"))
    no_json = tmp_path / "tok"
    shutil.copytree(edge_bundle / "tokenizer", no_json)
    (no_json / "tokenizer.json").unlink()
    long_prompt = " ".join(["a very long prompt about a castle"] * 30)
    for folder in (edge_bundle / "tokenizer", no_json):
        tok, info = load_clip_tokenizer(folder)
        assert info["max_length"] == 77
        fake = EdgePipeline.__new__(EdgePipeline)  # tokenize() needs only the tokenizer fields
        fake.tokenizer, fake.max_length = tok, info["max_length"]
        fake._pad_id, fake._bos_id, fake._eos_id = info["pad_id"], info["bos_id"], info["eos_id"]
        for prompt in [*PROMPTS, "", long_prompt]:
            want = slow(prompt, padding="max_length", max_length=77, truncation=True).input_ids
            assert fake.tokenize(prompt).tolist() == [want], (folder.name, prompt)


def test_long_prompt_truncated_with_warning(pipe, caplog) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    with caplog.at_level(logging.WARNING, logger="routet2i.edge_pipeline"):
        ids = pipe.tokenize(long_prompt)
    assert ids.shape == (1, 77) and ids[0, -1] == pipe._eos_id
    assert any("truncated" in r.message and "77" in r.message for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="routet2i.edge_pipeline"):
        caplog.clear()
        pipe.tokenize("short")
    assert not caplog.records


def test_seed_determinism_pil_and_callback(pipe) -> None:
    seen = []
    a = pipe(
        PROMPTS[0], num_inference_steps=3, seed=7, callback=lambda s, n, t, x: seen.append((s, n, x.shape))
    )
    b = pipe(PROMPTS[0], num_inference_steps=3, seed=7)
    c = pipe(PROMPTS[0], num_inference_steps=3, seed=8)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert seen == [(1, 3, (1, 4, 8, 8)), (2, 3, (1, 4, 8, 8)), (3, 3, (1, 4, 8, 8))]


def test_multistep_scheduler_state_does_not_leak_between_calls(edge_bundle) -> None:
    p = EdgePipeline(edge_bundle, providers=["cpu"], scheduler="dpm++")
    latents = _latents(0, p, 64)
    first = p(PROMPTS[0], num_inference_steps=5, latents=latents, output_type="np")
    second = p(PROMPTS[0], num_inference_steps=5, latents=latents, output_type="np")
    assert np.array_equal(first, second)


def test_largest_seed_is_uint64_max(pipe) -> None:
    assert pipe("a fox", num_inference_steps=1, seed=2**64 - 1, output_type="np").shape[-1] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": ""}, "prompt=''"),
        ({"prompt": "   "}, "prompt=''"),
        ({"prompt": None}, "prompt=None"),
        ({"num_inference_steps": 0}, r"num_inference_steps=0.*\[1, 1000\]"),
        ({"num_inference_steps": 1001}, r"num_inference_steps=1001.*\[1, 1000\]"),
        ({"num_inference_steps": 2.5}, "num_inference_steps=2.5"),
        ({"guidance_scale": math.nan}, "guidance_scale=nan.*finite"),
        ({"guidance_scale": math.inf}, "guidance_scale=inf"),
        ({"guidance_scale": -1.0}, "guidance_scale=-1.0"),
        ({"width": 72, "height": 64}, r"width=72, height=64.*multiples of 64"),
        ({"width": 64, "height": 2048}, r"height=2048.*\[64, 1024\]"),
        ({"width": 0, "height": 64}, "width=0"),
        ({"seed": -1}, "seed=-1"),
        ({"seed": 2**64}, r"seed=18446744073709551616.*2\*\*64 - 1"),  # uint64, as client and cloud
        ({"latents": np.zeros((1, 4, 16, 16), np.float32)}, r"latents: shape \(1, 4, 16, 16\)"),
        ({"latents": np.full((1, 4, 8, 8), np.nan, np.float32)}, "latents: contain NaN"),
        ({"negative_prompt": 3}, "negative_prompt=3"),
        ({"callback": "x"}, "callback='x'"),
        ({"output_type": "latent"}, "output_type='latent'"),
    ],
)
def test_bad_input_names_argument_and_range(pipe, kwargs, match) -> None:
    args = {"prompt": "a fox", "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**args)


def test_sizes_from_manifest(edge_bundle, pipe) -> None:
    manifest = json.loads((edge_bundle / "manifest.json").read_text())
    assert pipe.size_rule == SizeRule.from_manifest(manifest, 64, edge_bundle)
    only = SizeRule.from_manifest({"edge": {"image_size": {"allowed": [[64, 128]]}}}, 64, edge_bundle)
    assert only.allows(64, 128) and not only.allows(128, 64)
    with pytest.raises(BundleError, match="image sizes"):
        SizeRule.from_manifest({"edge": {"image_size": "big"}}, 64, edge_bundle)
    img = pipe("a fox", num_inference_steps=1, width=128, height=64)
    assert img.size == (128, 64)


def test_missing_and_tampered_files_name_the_file(edge_bundle, tmp_path) -> None:
    copy = tmp_path / "edge"
    shutil.copytree(edge_bundle, copy)
    unet = copy / "unet" / "model.onnx"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0xFF
    unet.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"unet/model.onnx.*sha256"):
        EdgePipeline(copy)
    unet.unlink()
    with pytest.raises(FileNotFoundError, match=r"unet/model.onnx"):
        EdgePipeline(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(BundleFileMissing, match="manifest.json"):
        EdgePipeline(copy)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EdgePipeline(tmp_path / "nowhere")


def test_required_file_missing_even_if_manifest_omits_it(edge_bundle, tmp_path) -> None:
    from routet2i.bundle import write_manifest

    copy = tmp_path / "edge"
    shutil.copytree(edge_bundle, copy)
    (copy / "vae_decoder" / "model.onnx").unlink()
    write_manifest(copy, kind="edge")
    with pytest.raises(BundleFileMissing, match=r"vae_decoder/model.onnx.*required"):
        EdgePipeline(copy)


def test_router_bundle_is_not_an_edge_bundle(edge_bundle, tmp_path) -> None:
    from routet2i.bundle import write_manifest

    copy = tmp_path / "edge"
    shutil.copytree(edge_bundle, copy)
    write_manifest(copy, kind="router")
    with pytest.raises(BundleError, match="expected 'edge'"):
        EdgePipeline(copy)


def test_gpu_only_bundle_refused_on_cpu(edge_bundle, tmp_path) -> None:
    from routet2i.bundle import write_manifest

    copy = tmp_path / "edge"
    shutil.copytree(edge_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    edge = {**manifest["edge"], "execution": "gpu", "dtype": "float16"}
    write_manifest(copy, kind="edge", extra={"edge": edge})
    with pytest.raises(BundleError, match="GPU execution providers"):
        EdgePipeline(copy, providers=["cpu"])


def test_unknown_scheduler_name(edge_bundle) -> None:
    with pytest.raises(ValueError, match="scheduler='heun'.*allowed"):
        EdgePipeline(edge_bundle, scheduler="heun")


# ---------------------------------------------------------------------------------------- routet2i.ort


def test_providers_default_named_and_unavailable() -> None:
    avail = available_providers()
    default = resolve_providers(None)
    assert default and all(p in avail for p in default)
    assert default[-1] == "CPUExecutionProvider"
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match=r"'TensorrtExecutionProvider' is not available.*available: .*CPU"):
        resolve_providers(["tensorrt"])
    with pytest.raises(ValueError, match="providers=\\[\\]"):
        resolve_providers([])


def test_providers_env_override(monkeypatch) -> None:
    monkeypatch.setenv("ROUTET2I_PROVIDERS", "cuda")
    if "CUDAExecutionProvider" not in available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider"):
            resolve_providers(None)


def test_ort_model_casts_to_session_dtypes_and_io_binding(edge_bundle, caplog) -> None:
    path = edge_bundle / "unet" / "model.onnx"
    feeds = {
        "sample": np.ones((1, 4, 8, 8), np.float64),  # cast to float32
        "timestep": 999,  # python int -> the model's float scalar
        "encoder_hidden_states": np.zeros((1, 77, 32), np.float32),
    }
    with caplog.at_level(logging.INFO, logger="routet2i.ort"):
        plain = OrtModel(path, providers=["cpu"], config=SessionConfig(intra_op_threads=1))
    assert any("unet/model.onnx" in r.message and "CPUExecutionProvider" in r.message for r in caplog.records)
    bound = OrtModel(path, providers=["cpu"], config=SessionConfig(io_binding=True))
    assert plain.input_types["timestep"] is np.float32 and not plain.io_binding and bound.io_binding
    a, b = plain(**feeds)["out_sample"], bound(**feeds)["out_sample"]
    assert a.shape == (1, 4, 8, 8) and np.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="missing \\['encoder_hidden_states'\\]"):
        plain(sample=feeds["sample"], timestep=1)
    with pytest.raises(ValueError, match="graph_optimization='max'"):
        SessionConfig(graph_optimization="max")


def test_ort_model_bad_file(tmp_path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BundleError, match="model.onnx"):
        OrtModel(bad)
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        OrtModel(tmp_path / "missing.onnx")


def test_provider_chain_with_fake_gpu_build(monkeypatch) -> None:
    """On a build with TensorRT and CUDA (faked here: no GPU is lent), the default chain is TRT -> CUDA -> CPU,
    naming TensorRT alone keeps CUDA and CPU behind it, and GPU providers use IO binding."""
    import routet2i.ort as ort_mod

    fake = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort_mod, "available_providers", lambda: list(fake))
    assert resolve_providers(None) == fake
    assert resolve_providers(["trt"]) == fake
    assert resolve_providers([("cuda", {"device_id": 0})]) == [
        ("CUDAExecutionProvider", {"device_id": 0}),
        "CPUExecutionProvider",
    ]
    assert ort_mod.GPU_PROVIDERS["CUDAExecutionProvider"] == "cuda"
