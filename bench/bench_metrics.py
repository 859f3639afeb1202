"""Contrastive CLIP metrics: images/s scored in batches vs one image per call.

Two CLIP sizes, random weights (the hub is not needed): the tiny CLIP of `routet2i dev tiny-models`, and a
full-size ViT-B/32 ``CLIPModel`` (``CLIPConfig()`` defaults: ViT-B/32 vision tower at 224 px, 12-layer text
tower, projection 512) with the tiny tokenizer and a 224 px ``CLIPImageProcessor``. Both modes score the
same images with the same 10 metric pairs; the anchor is the one-image-per-call loop measured in the same
run. Prints the median images/s of each mode over --repeats passes and the ratio batched / per-image.

    .venv/bin/python bench/bench_metrics.py [--images 16] [--batch-size 32] [--repeats 3] [--only tiny|vitb32] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _images(n: int, side: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


def _median_rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up (allocations, lazy init)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n_images / statistics.median(times)


def bench(name: str, scorer, images: list, batch_size: int, repeats: int) -> None:
    scorer.text_embeddings()
    batched = _median_rate(lambda: scorer.score(images, batch_size=batch_size), len(images), repeats)
    single = _median_rate(lambda: [scorer.score([im], batch_size=1) for im in images], len(images), repeats)
    print(
        f"{name:<8} device={scorer.device.type} images={len(images)} batch={batch_size}: "
        f"batched {batched:8.1f} img/s | one per call {single:8.1f} img/s | ratio {batched / single:5.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16, help="images per pass")
    ap.add_argument("--batch-size", type=int, default=32, help="images per CLIP call in batched mode")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per mode (median reported)")
    ap.add_argument("--image-size", type=int, default=512, help="side of the input images (SD2.1 base: 512)")
    ap.add_argument("--only", choices=["tiny", "vitb32"], help="run one model only")
    ap.add_argument("--device", help="torch device (default: best available)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = ap.parse_args()

    import torch
    from routet2i.training.metrics import ClipQualityScorer
    from routet2i.training.tiny_models import build_tiny_models
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizerFast

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, images {args.image_size}px")
    images = _images(args.images, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = build_tiny_models(Path(tmp) / "tiny")["clip"]
        if args.only in (None, "tiny"):
            bench(
                "tiny", ClipQualityScorer(clip_dir, device=args.device), images, args.batch_size, args.repeats
            )
        if args.only in (None, "vitb32"):
            torch.manual_seed(0)
            model = CLIPModel(CLIPConfig())  # ViT-B/32 shapes, random weights
            scorer = ClipQualityScorer.from_components(
                model,
                CLIPTokenizerFast.from_pretrained(clip_dir),
                CLIPImageProcessor(),  # 224 px, CLIP mean/std
                device=args.device,
                name="vit-b/32",
            )
            bench("vit-b/32", scorer, images, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
