"""Edge generation speed: our torch-free ONNX pipeline vs diffusers' torch StableDiffusionPipeline, per
denoising step, on the full-size SD2.1-base UNet (random weights) at 512x512, on this CPU.

One diffusers pipeline folder is built once (cached): the UNet with stabilityai/stable-diffusion-2-1-base's
config (written below, 865.9M parameters, random weights: timings do not depend on weight values), a small
CLIP text encoder of the right width (1024) and the tiny VAE (both run once per image, outside the
denoising loop this benchmark times), DDIM with SD2.1-base's schedule (epsilon). ``routet2i export edge``
turns it into an edge bundle (in a subprocess, so its memory is returned). Then, in one process, both
pipelines generate the same prompt with classifier-free guidance (the UNet runs on a batch of 2), runs
interleaved torch / ONNX, the same thread count for both; a step's time is the gap between two consecutive
per-step callbacks (UNet + guidance + scheduler step). Prints the medians and the ratio, and records them
in $ROUTET2I_BENCH_CACHE/bench_edge.json (read by bench_router_latency.py).

    .venv/bin/python bench/bench_edge.py [--size 512] [--steps 4] [--runs 2] [--threads N] [--optimized]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _sd21 import SD21_BASE_UNET

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ROUTET2I_BENCH_CACHE", Path.home() / ".cache" / "routet2i" / "bench"))
PROMPT = "a red fox in the snow, highly detailed photograph"

# stabilityai/stable-diffusion-2-1-base ships PNDM with this schedule; DDIM (ported) with the same betas.
SD21_BASE_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


def _say(msg: str) -> None:
    print(f"[bench_edge] {msg}", flush=True)


def build_pipeline(out: Path) -> Path:
    """The full-size-UNet pipeline folder (cached)."""
    if (out / "model_index.json").is_file():
        return out
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from routet2i.training.tiny_models import build_tiny_models
    from transformers import CLIPTextConfig, CLIPTextModel

    work = Path(tempfile.mkdtemp(prefix=".sd21-base-build.", dir=out.parent))
    try:
        _say("building the tiny models (tokenizer, VAE)")
        tiny = build_tiny_models(work / "tiny")
        base = StableDiffusionPipeline.from_pretrained(str(tiny["edge-sd21"]), safety_checker=None)
        _say("building the full-size SD2.1-base UNet (random weights)")
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD21_BASE_UNET)
        n_params = sum(p.numel() for p in unet.parameters())
        _say(f"UNet parameters: {n_params / 1e6:.1f}M")
        torch.manual_seed(1)
        text_config = CLIPTextConfig(
            vocab_size=base.text_encoder.config.vocab_size,
            hidden_size=1024,
            intermediate_size=1024,
            num_hidden_layers=1,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=base.text_encoder.config.bos_token_id,
            eos_token_id=base.text_encoder.config.eos_token_id,
            pad_token_id=base.text_encoder.config.pad_token_id,
        )
        pipe = StableDiffusionPipeline(
            vae=base.vae,
            text_encoder=CLIPTextModel(text_config),
            tokenizer=base.tokenizer,
            unet=unet,
            scheduler=DDIMScheduler(**SD21_BASE_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        tmp = work / "pipeline"
        pipe.save_pretrained(tmp)
        shutil.copyfile(
            tiny["edge-sd21"] / "tokenizer" / "tokenizer.json", tmp / "tokenizer" / "tokenizer.json"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def export_bundle(pipeline: Path, out: Path, optimized: bool) -> Path:
    """`routet2i export edge` in a subprocess (its peak memory is returned to the system), cached."""
    if (out / "manifest.json").is_file():
        return out
    cmd = [sys.executable, "-m", "routet2i.training.cli", "export", "edge", "--pipeline", str(pipeline),
           "--out", str(out), "--force", "--max-side", "512", "--no-vae-encoder", "--validate-steps", "1"]  # fmt: skip
    if optimized:
        cmd += ["--optimize", "--optimize-target", "cpu"]
    _say("exporting: " + " ".join(cmd[2:]))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    _say(f"export took {time.perf_counter() - t0:.0f}s")
    return out


class StepTimer:
    """Per-step gaps between consecutive callbacks."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def mark(self) -> None:
        self.stamps.append(time.perf_counter())

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 64, <= 512)")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per run (steps-1 timed gaps)")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per pipeline (after one warm-up run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and ORT intra-op threads")
    ap.add_argument("--optimized", action="store_true", help="also time a bundle exported with --optimize")
    ap.add_argument("--prepare", action="store_true", help="only build and export (cached), time nothing")
    args = ap.parse_args()

    CACHE.mkdir(parents=True, exist_ok=True)
    pipeline_dir = build_pipeline(CACHE / "sd21-base-fullunet")
    bundles = {"onnx": export_bundle(pipeline_dir, CACHE / "sd21-base-fullunet-onnx", optimized=False)}
    if args.optimized:
        bundles["onnx-optimized"] = export_bundle(
            pipeline_dir, CACHE / "sd21-base-fullunet-onnx-opt", optimized=True
        )
    if args.prepare:
        _say(f"prepared: {pipeline_dir}, {', '.join(str(b) for b in bundles.values())}")
        return

    import numpy as np
    import onnxruntime
    import torch
    from diffusers import StableDiffusionPipeline
    from routet2i.edge_pipeline import EdgePipeline
    from routet2i.ort import SessionConfig

    torch.set_num_threads(args.threads)
    _say(f"loading pipelines (threads {args.threads})")
    torch_pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), safety_checker=None)
    torch_pipe.set_progress_bar_config(disable=True)
    cfg = SessionConfig(intra_op_threads=args.threads)
    edge = {
        name: EdgePipeline(path, providers=["cpu"], session_config=cfg, check_hashes=False)
        for name, path in bundles.items()
    }
    side = args.size
    latents = np.random.default_rng(0).standard_normal((1, 4, side // 8, side // 8), dtype=np.float32)

    def run_torch(steps: int) -> list[float]:
        timer = StepTimer()

        def on_step(pipe, i, t, kwargs):
            timer.mark()
            return kwargs

        with torch.inference_mode():
            torch_pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=side, height=side,
                       latents=torch.from_numpy(latents), callback_on_step_end=on_step, output_type="np")  # fmt: skip
        return timer.gaps()

    def run_onnx(name: str, steps: int) -> list[float]:
        timer = StepTimer()
        edge[name](PROMPT, num_inference_steps=steps, guidance_scale=7.5, width=side, height=side,
                   latents=latents, callback=lambda *a: timer.mark(), output_type="np")  # fmt: skip
        return timer.gaps()

    runners = {"torch": run_torch, **{n: functools.partial(run_onnx, n) for n in edge}}
    _say("warm-up: one 2-step run each")
    for name, fn in runners.items():
        t0 = time.perf_counter()
        fn(2)
        _say(f"  {name}: {time.perf_counter() - t0:.1f}s")
    gaps: dict[str, list[float]] = {name: [] for name in runners}
    per_run: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for r in range(args.runs):
        for name in order if r % 2 == 0 else order[::-1]:
            g = runners[name](args.steps)
            gaps[name] += g
            per_run[name].append(statistics.median(g))
            _say(f"  run {r + 1} {name}: steps {', '.join(f'{x:.2f}s' for x in g)}")

    med = {name: statistics.median(g) for name, g in gaps.items()}
    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"\nper denoising step, {side}x{side}, CFG batch 2, full-size SD2.1-base UNet fp32, CPU ({device}), "
          f"{args.threads} threads, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}:")  # fmt: skip
    for name, m in med.items():
        extra = "" if name == "torch" else f"   speed-up vs torch {med['torch'] / m:.2f}x (goal >= 1.5x)"
        print(f"  {name:<15} median {m:7.2f}s over {len(gaps[name])} steps{extra}")
    for name in med:
        if name != "torch":  # adjacent runs see similar machine load: their ratios are the steadier figure
            paired = [t / o for t, o in zip(per_run["torch"], per_run[name], strict=True)]
            print(f"  {name:<15} per-run paired speed-ups {', '.join(f'{x:.2f}x' for x in paired)} "
                  f"(median {statistics.median(paired):.2f}x)")  # fmt: skip
    record = {
        "size": side,
        "threads": args.threads,
        "device": f"CPU ({device})",
        "torch_step_s": med["torch"],
        "onnx_step_s": min(m for n, m in med.items() if n != "torch"),
        "steps": {n: g for n, g in gaps.items()},
        "medians": med,
        "per_run_medians": per_run,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "unix": int(time.time()),
    }
    (CACHE / "bench_edge.json").write_text(json.dumps(record, indent=2) + "\n")
    _say(f"recorded {CACHE / 'bench_edge.json'}")


if __name__ == "__main__":
    main()
