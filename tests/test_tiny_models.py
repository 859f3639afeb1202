"""Tiny random-weight models: real architectures, load with from_pretrained, generate, deterministic."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

PROMPTS = [
    "a red fox in the snow",
    "An astronaut riding a HORSE on the moon, 4k!!",
    "  two\tcats\nsleeping  ",
    "",
]


def _weights_hash(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.safetensors")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_sd21_shape_and_generation(tiny_models: dict[str, Path]) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["edge-sd21"])
    unet = pipe.unet.config
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.use_linear_projection is True
    assert isinstance(unet.attention_head_dim, (list, tuple)) and len(unet.attention_head_dim) == 4
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert isinstance(pipe.text_encoder, CLIPTextModel) and pipe.text_encoder.config.hidden_act == "gelu"
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 8
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.safety_checker is None
    assert sum(p.numel() for p in pipe.unet.parameters()) < 5_000_000

    def gen():
        return pipe(
            "a red fox in the snow",
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    a, b = gen(), gen()
    assert a.shape == (1, 64, 64, 3)
    assert (a == b).all()
    assert a.std() > 0  # not a constant image


def test_sd3_shape_and_generation(tiny_models: dict[str, Path]) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_models["cloud-sd3"])
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.latent_channels == 16
    image = pipe(
        "a red fox in the snow",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and image.std() > 0


def test_clip_model_and_processor(tiny_models: dict[str, Path]) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_models["clip"]).eval()
    processor = CLIPProcessor.from_pretrained(tiny_models["clip"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    inputs = processor(text=PROMPTS[:2], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert logits.shape == (1, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "sub", ["edge-sd21/tokenizer", "cloud-sd3/tokenizer", "cloud-sd3/tokenizer_2", "clip"]
)
def test_fast_tokenizer_json_matches_slow(tiny_models: dict[str, Path], sub: str) -> None:
    """The torch-free device runtime reads tokenizer.json with `tokenizers`: same ids as CLIPTokenizer."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    folder = tiny_models[sub.split("/")[0]].parent / sub
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    slow = CLIPTokenizer.from_pretrained(folder)
    for prompt in PROMPTS:
        ids = slow(prompt).input_ids
        assert fast.encode(prompt).ids == ids, prompt
        assert ids[0] == slow.bos_token_id and ids[-1] == slow.eos_token_id
    # common words are single BPE tokens (the merges were learned), not bytes
    assert len(slow("a photo of the painting").input_ids) == 7


def test_t5_tokenizer(tiny_models: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["cloud-sd3"] / "tokenizer_3")
    ids = tok("a photo of a cat").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.unk_token_id not in ids


def test_build_is_deterministic(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from routet2i.training.tiny_models import build_tiny_models

    again = build_tiny_models(tmp_path / "again")
    for name, folder in tiny_models.items():
        assert _weights_hash(folder) == _weights_hash(again[name]), name
        assert (folder / "tokenizer" if name != "clip" else folder).exists()


def test_cli_refuses_non_empty_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from routet2i.training.cli import main

    out = tmp_path / "models"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["dev", "tiny-models", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "--force" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").read_text() == "user data"
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no temp folder left behind


def test_cli_force_replaces(tmp_path: Path) -> None:
    from routet2i.training.cli import main

    out = tmp_path / "models"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    assert main(["dev", "tiny-models", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip", "cloud-sd3", "edge-sd21"]
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_tiny_demo_writes_two_pngs(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    from PIL import Image
    from routet2i.training.cli import main

    models = tiny_models["edge-sd21"].parent
    assert main(["dev", "tiny-demo", "--out", str(tmp_path), "--models", str(models)]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    for name in ("edge_sd21.png", "cloud_sd3.png"):
        assert Image.open(tmp_path / name).size == (64, 64)
