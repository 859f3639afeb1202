"""`routet2i dev tiny-demo`: one tiny SD2.1 and one tiny SD3 generation, written as PNGs.

The tiny models have the real architectures and RANDOM weights, so the images are noise: the demo shows
that the pipelines build, load and run end to end on this machine, nothing about image quality.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from routet2i._errors import UsageError

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path(".cache") / "tiny-models"
PROMPT = "a red fox in the snow"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="folder for the two PNGs")
    parser.add_argument(
        "--models",
        type=Path,
        default=DEFAULT_CACHE,
        help=f"tiny-models folder, built there when missing (default {DEFAULT_CACHE})",
    )
    parser.add_argument("--prompt", default=PROMPT, help="prompt for both pipelines")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


def ensure_tiny_models(models: Path) -> dict[str, Path]:
    """Reuse ``models`` when it holds the three tiny folders, else build them there."""
    from routet2i.training.tiny_models import build_tiny_models

    names = ("edge-sd21", "cloud-sd3", "clip")
    if all((models / n / ("model_index.json" if n != "clip" else "config.json")).is_file() for n in names):
        return {n: models / n for n in names}
    print(f"building tiny models in {models} (offline, fixed seeds)")
    return build_tiny_models(models, force=models.is_dir() and any(models.iterdir()))


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.steps > 50:
        raise UsageError(f"--steps {args.steps}: must be between 1 and 50")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    import torch
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    paths = ensure_tiny_models(args.models)
    args.out.mkdir(parents=True, exist_ok=True)
    print("NOTE: the tiny models have RANDOM weights: the images below are noise, not pictures.")
    for name, cls, file in (
        ("edge-sd21", StableDiffusionPipeline, "edge_sd21.png"),
        ("cloud-sd3", StableDiffusion3Pipeline, "cloud_sd3.png"),
    ):
        pipe = cls.from_pretrained(paths[name])
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        image = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(args.seed),
        ).images[0]
        seconds = time.perf_counter() - start
        tmp = args.out / f".{file}.tmp"
        image.save(tmp, format="PNG")
        tmp.replace(args.out / file)
        print(f"{name} ({cls.__name__}, {args.steps} steps, 64x64, {seconds:.2f}s): {args.out / file}")
    return 0
