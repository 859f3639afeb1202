"""Tiny random-weight models with the REAL architectures: SD2.1, SD3 and CLIP, built offline.

The Hugging Face hub is not reachable where this project is developed and tested, so tests and the demo run
on pipelines that have exactly the classes and wiring of the real ones (an SD2.1-shaped
``StableDiffusionPipeline``, a ``StableDiffusion3Pipeline``, a ``CLIPModel`` with its processor) at tiny
sizes with random weights. Everything is built from fixed seeds: two builds give identical weights.

Tokenizers cannot come from the hub either: a byte-level BPE vocabulary with CLIP's ``</w>`` conventions is
learned in code from a small built-in corpus, and a tiny sentencepiece model is trained for T5. Both are
saved in their slow and fast (``tokenizer.json``) forms; the torch-free device runtime reads
``tokenizer.json`` with the ``tokenizers`` library.

CLI: ``routet2i dev tiny-models --out DIR [--force]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from routet2i._errors import UsageError
from routet2i.bundle import publish_folder
from routet2i.paths import check_output_path

logger = logging.getLogger(__name__)

__all__ = ["TinySizes", "build_tiny_models", "build_clip_tokenizer_files", "add_arguments", "run"]

SEED = 0
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# A small built-in corpus: the BPE merges and the T5 sentencepiece model are learned from it, so common
# prompt words become single tokens (any other text still tokenizes, byte by byte for BPE).
CORPUS = """\
a photo of a cat sitting on a red chair next to a window
a painting of a mountain landscape at sunset with a lake in the foreground
an astronaut riding a horse on the moon, digital art, highly detailed
a bowl of fruit on a wooden table, still life, oil painting
two dogs playing in the snow in a park, photograph
a futuristic city skyline at night with neon lights and flying cars
a portrait of an old man with a long white beard, black and white photo
a small red fox standing in a green forest in the morning light
a cup of coffee and a book on a table near the window, cozy interior
a castle on a hill surrounded by clouds, fantasy illustration
three apples and a banana on a blue plate
a woman wearing a yellow dress walking on the beach at sunrise
a robot reading a newspaper in a cafe, cartoon style
the street of a small town in the rain with people holding umbrellas
a giraffe and an elephant drinking water at a river in africa
a close up photo of a flower with a bee, macro photography
a sailing boat on the ocean under a stormy sky with lightning
a kitchen with white cabinets and a large window, interior design
a child flying a kite in a field of yellow flowers
a bicycle leaning against a brick wall in the city
an owl sitting on a branch in the moonlight, watercolor
a plate of pasta with tomato sauce and basil, food photography
a train crossing a bridge over a river in the mountains
a teddy bear wearing sunglasses on a skateboard
a green dragon breathing fire over a medieval village
a living room with a sofa, a lamp and a painting on the wall
a pair of red shoes on a white background, product photo
an abstract painting with blue, orange and purple shapes
a snowy forest with tall pine trees and a wooden cabin
a cute puppy sleeping on a soft blanket
"""


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny models (the real architectures, scaled down)."""

    clip_merges: int = 300  # BPE merges learned from CORPUS for the CLIP vocabulary
    t5_vocab: int = 200  # sentencepiece vocabulary size for the T5 tokenizer (a soft limit)
    text_hidden: int = 32  # CLIP text encoder width (SD2.1: 1024)
    text_layers: int = 2  # CLIP text encoder layers (SD2.1: 23)
    text_heads: int = 4  # CLIP text encoder attention heads (SD2.1: 16)
    max_length: int = 77  # tokenizer model_max_length and text position embeddings (as the real ones)
    unet_channels: tuple[int, int, int, int] = (32, 32, 64, 64)  # SD2.1: (320, 640, 1280, 1280)
    unet_heads: tuple[int, int, int, int] = (2, 2, 4, 4)  # per-block attention heads (SD2.1: 5, 10, 20, 20)
    vae_channels: tuple[int, int, int, int] = (16, 16, 32, 32)  # SD VAE: (128, 256, 512, 512): factor 8
    vae_groups: int = 8  # GroupNorm groups in the VAE (real: 32)
    image_size: int = 64  # default generation size (pixels); latents are image_size / 8
    t5_d_model: int = 64  # T5 width; SD3 joint_attention_dim = T5 width >= 2 CLIP widths
    sd3_layers: int = 2  # SD3 transformer (MMDiT) blocks (SD3-medium: 24)
    sd3_heads: int = 2  # SD3 attention heads (SD3-medium: 24)
    sd3_head_dim: int = 16  # SD3 attention head dimension (SD3-medium: 64)
    clip_image_size: int = 32  # CLIP vision input size (CLIP ViT-L/14: 224)
    clip_patch: int = 8  # CLIP vision patch size (ViT-L/14: 14)
    clip_projection: int = 32  # CLIP projection dim (ViT-L/14: 768)


# ----------------------------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (the BPE base alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _learn_bpe(corpus: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on the words of ``corpus`` with CLIP's convention: the last symbol of a word ends in
    ``</w>``. Ties are broken by the pair itself, so the result is deterministic."""
    byte_encoder = _bytes_to_unicode()
    words = Counter(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", corpus.lower()))
    vocab: dict[tuple[str, ...], int] = {}
    for word, freq in words.items():
        chars = [byte_encoder[b] for b in word.encode("utf-8")]
        vocab[tuple(chars[:-1]) + (chars[-1] + "</w>",)] = freq
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in vocab.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best, count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append(best)
        new_vocab = {}
        for symbols, freq in vocab.items():
            out, i = [], 0
            while i < len(symbols):
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_vocab[tuple(out)] = freq
        vocab = new_vocab
    return merges


def build_clip_tokenizer_files(folder: Path, sizes: TinySizes = TinySizes()) -> int:
    """Write ``vocab.json`` and ``merges.txt`` of a byte-level CLIP BPE vocabulary. Returns its size.

    Order as in OpenAI's CLIP vocabulary: the 256 byte characters, the same with ``</w>``, the merges,
    then ``<|startoftext|>`` and ``<|endoftext|>``."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    merges = _learn_bpe(CORPUS, sizes.clip_merges)
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for tok in tokens:  # a merge can reproduce an existing token only in degenerate corpora; keep first
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(vocab)


def _clip_tokenizers(work: Path, sizes: TinySizes, pad_token: str):
    """(slow CLIPTokenizer, fast CLIPTokenizerFast) over the generated vocabulary."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    build_clip_tokenizer_files(work, sizes)
    kwargs = dict(
        bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=pad_token, model_max_length=sizes.max_length
    )
    slow = CLIPTokenizer(str(work / "vocab.json"), str(work / "merges.txt"), **kwargs)
    fast = CLIPTokenizerFast(str(work / "vocab.json"), str(work / "merges.txt"), from_slow=True, **kwargs)
    return slow, fast


def _save_clip_tokenizer(slow, fast, folder: Path) -> None:
    """Save the slow files (what the real SD checkpoints ship) plus ``tokenizer.json`` (fast)."""
    slow.save_pretrained(folder)
    fast.backend_tokenizer.save(str(folder / "tokenizer.json"))


def _t5_tokenizer(work: Path, sizes: TinySizes):
    """A T5TokenizerFast over a unigram sentencepiece model trained on CORPUS (T5 ids: pad 0, eos 1, unk 2)."""
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()),
        model_writer=model,
        vocab_size=sizes.t5_vocab,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        seed_sentencepiece_size=10000,
        minloglevel=2,
    )
    work.mkdir(parents=True, exist_ok=True)
    (work / "spiece.model").write_bytes(model.getvalue())
    return T5TokenizerFast(vocab_file=str(work / "spiece.model"), extra_ids=0, legacy=True, from_slow=True)


# ---------------------------------------------------------------------------------------------------- models


def _clip_text_config(sizes: TinySizes, vocab_size: int, eos_id: int, bos_id: int, pad_id: int, act: str):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=sizes.text_hidden,
        intermediate_size=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        max_position_embeddings=sizes.max_length,
        hidden_act=act,
        projection_dim=sizes.text_hidden,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )


def _build_sd21(out: Path, work: Path, sizes: TinySizes) -> None:
    """StableDiffusionPipeline shaped like stabilityai/stable-diffusion-2-1."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    # SD2.1's tokenizer pads with "!" (id 0), unlike SD1.x which pads with <|endoftext|>.
    slow, fast = _clip_tokenizers(work / "sd21-tok", sizes, pad_token="!")
    vocab = slow.get_vocab()
    torch.manual_seed(SEED)
    # SD2.1's OpenCLIP ViT-H text tower uses gelu (CLIP ViT-L uses quick_gelu).
    text_config = _clip_text_config(sizes, len(vocab), vocab[EOS], vocab[BOS], vocab["!"], "gelu")
    text_encoder = CLIPTextModel(text_config)
    torch.manual_seed(SEED + 1)
    unet = UNet2DConditionModel(
        sample_size=sizes.image_size // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=sizes.unet_channels,
        layers_per_block=1,
        attention_head_dim=sizes.unet_heads,  # diffusers' name; per block heads, as in SD2.1's config
        cross_attention_dim=sizes.text_hidden,
        use_linear_projection=True,
        norm_num_groups=16,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    torch.manual_seed(SEED + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=sizes.vae_groups,
        sample_size=sizes.image_size,
        scaling_factor=0.18215,
    )
    # SD2.1's scheduler_config.json: DDIM, v-prediction, scaled-linear betas 0.00085..0.012.
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=slow,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    fast.backend_tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))


def _build_sd3(out: Path, work: Path, sizes: TinySizes) -> None:
    """StableDiffusion3Pipeline shaped like stabilityai/stable-diffusion-3-medium-diffusers."""
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    # SD3 ships two CLIP tokenizers: CLIP-L pads with <|endoftext|>, OpenCLIP bigG with "!".
    slow_1, fast_1 = _clip_tokenizers(work / "sd3-tok1", sizes, pad_token=EOS)
    slow_2, fast_2 = _clip_tokenizers(work / "sd3-tok2", sizes, pad_token="!")
    t5_tok = _t5_tokenizer(work / "sd3-t5", sizes)
    vocab = slow_1.get_vocab()
    torch.manual_seed(SEED + 10)
    te1 = CLIPTextModelWithProjection(
        _clip_text_config(sizes, len(vocab), vocab[EOS], vocab[BOS], vocab[EOS], "quick_gelu")
    )
    torch.manual_seed(SEED + 11)
    te2 = CLIPTextModelWithProjection(
        _clip_text_config(sizes, len(vocab), vocab[EOS], vocab[BOS], vocab["!"], "gelu")
    )
    torch.manual_seed(SEED + 12)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=sizes.t5_d_model,
            d_kv=sizes.t5_d_model // 4,
            d_ff=2 * sizes.t5_d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1 (SD3 uses google/t5-v1_1-xxl)
            is_encoder_decoder=False,
            use_cache=False,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    patch = 2
    torch.manual_seed(SEED + 13)
    transformer = SD3Transformer2DModel(
        sample_size=sizes.image_size // 8,
        patch_size=patch,
        in_channels=16,
        out_channels=16,
        num_layers=sizes.sd3_layers,
        attention_head_dim=sizes.sd3_head_dim,
        num_attention_heads=sizes.sd3_heads,
        joint_attention_dim=sizes.t5_d_model,
        caption_projection_dim=sizes.sd3_heads * sizes.sd3_head_dim,
        pooled_projection_dim=2 * sizes.text_hidden,  # concatenated CLIP-L + CLIP-G pooled projections
        pos_embed_max_size=2 * sizes.image_size // 8 // patch,
    )
    torch.manual_seed(SEED + 14)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=sizes.vae_groups,
        sample_size=sizes.image_size,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.5305,  # SD3's VAE
        shift_factor=0.0609,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=slow_1,
        text_encoder_2=te2,
        tokenizer_2=slow_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )
    pipe.save_pretrained(out)
    fast_1.backend_tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    fast_2.backend_tokenizer.save(str(out / "tokenizer_2" / "tokenizer.json"))


def _build_clip(out: Path, work: Path, sizes: TinySizes) -> None:
    """CLIPModel + CLIPProcessor shaped like openai/clip-vit-large-patch14."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPVisionConfig

    slow, fast = _clip_tokenizers(work / "clip-tok", sizes, pad_token=EOS)
    vocab = slow.get_vocab()
    text_config = _clip_text_config(sizes, len(vocab), vocab[EOS], vocab[BOS], vocab[EOS], "quick_gelu")
    vision_config = CLIPVisionConfig(
        hidden_size=sizes.text_hidden,
        intermediate_size=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        image_size=sizes.clip_image_size,
        patch_size=sizes.clip_patch,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=sizes.clip_projection,
    )
    torch.manual_seed(SEED + 20)
    model = CLIPModel(config)
    side = sizes.clip_image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=fast)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny_models(out: Path, force: bool = False, sizes: TinySizes = TinySizes()) -> dict[str, Path]:
    """Build ``out/edge-sd21``, ``out/cloud-sd3`` and ``out/clip``; return {name: folder}.

    ``out`` must not exist or be empty unless ``force``: the models are written to a temporary folder
    next to it and renamed into place at the end, so nothing half-written is left behind."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: folder exists and is not empty (pass --force to replace it)")
    check_output_path(out, "--out", folder=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = {"edge-sd21": _build_sd21, "cloud-sd3": _build_sd3, "clip": _build_clip}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        work = tmp / ".work"
        for name, build in names.items():
            logger.info("building tiny %s", name)
            build(tmp / name, work, sizes)
        shutil.rmtree(work)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: out / name for name in names}


# ------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, type=Path, help="folder to create (edge-sd21, cloud-sd3, clip)"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")


def run(args: argparse.Namespace) -> int:
    paths = build_tiny_models(args.out, force=args.force)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print("random weights: these models prove the plumbing and formats; their images are noise")
    return 0
