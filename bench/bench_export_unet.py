"""Full-size check of the edge export: the SD2.1-base UNet (865.9M parameters, random weights) to ONNX.

Builds ``UNet2DConditionModel`` from stabilityai/stable-diffusion-2-1-base's ``unet/config.json`` (written out
below; the hub is not reachable here and timings do not depend on weight values), exports it with the
TorchScript exporter that optimum-onnx uses for Stable Diffusion, under the edge bundle's UNet spec
(``routet2i.export.specs.UNET``: names, dynamic axes, opset 18; weights as external data, the graph is over
protobuf's 2 GB), then runs ONNX Runtime (CPU) on 64x64 latents (a 512x512 image) against torch.

Prints: parameters, export time, peak memory (process max RSS after the export and after the comparison),
file size, max abs / relative diff ORT vs torch, and the time per UNet step of ORT and torch, measured
interleaved on the same inputs (medians), with their ratio. Not part of `make test` (minutes and ~12 GB).

    .venv/bin/python bench/bench_export_unet.py [--runs 3] [--batch 2] [--threads 2] [--keep DIR] [--tiny]

``--full-pipeline`` instead runs the whole ``routet2i export edge`` (optimum-onnx ``main_export``, per-graph
and pipeline validation at 64x64, manifest) on an SD2.1-base-shaped pipeline with full-size UNet, VAE and
OpenCLIP-H text encoder (random weights; the generated tiny CLIP vocabulary, whose ids are all within the
49408-token embedding) and prints its wall time, peak memory and bundle size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _sd21 import SD21_BASE_UNET, SD21_BASE_UNET_PARAMS

EXPECTED_PARAMS = SD21_BASE_UNET_PARAMS


def _max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


# OpenCLIP ViT-H/14 text tower as SD2.1 ships it (text_encoder/config.json).
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)  # fmt: skip
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)  # fmt: skip


def full_pipeline(args: argparse.Namespace) -> int:
    """`routet2i export edge` end to end on a full-size SD2.1-base-shaped pipeline (random weights)."""
    import gc

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from routet2i.export.edge import EdgeExportConfig, export_edge
    from routet2i.training.tiny_models import BOS, EOS, build_clip_tokenizer_files
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(args.threads)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-sd21-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "sd21-base-random", work / "bundle"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    tok_dir = work / "tok"
    build_clip_tokenizer_files(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), bos_token=BOS,
                              eos_token=EOS, unk_token=EOS, pad_token="!", model_max_length=77)  # fmt: skip
    vocab = tokenizer.get_vocab()
    text = CLIPTextModel(
        CLIPTextConfig(**SD21_TEXT, bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=0)
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD21_VAE),
        text_encoder=text,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD21_BASE_UNET),
        scheduler=DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),  # fmt: skip
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    n = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("unet", "vae", "text_encoder")}
    pipe.save_pretrained(src)
    del pipe, text
    gc.collect()
    print(f"built and saved the pipeline in {time.perf_counter() - t0:.0f}s: "
          + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in n.items()), flush=True)  # fmt: skip
    rss_before = _max_rss_gb()
    t0 = time.perf_counter()
    result = export_edge(
        EdgeExportConfig(pipeline=str(src), out=out, vae_encoder=False, validate_size=(64, 64))
    )
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print("\n== routet2i export edge, full-size SD2.1-base-shaped pipeline (random weights, CPU) ==")
    print(f"export + validation     {seconds:.0f} s")
    print(
        f"peak memory (max RSS)   {_max_rss_gb():.1f} GB (building the pipeline alone: {rss_before:.1f} GB)"
    )
    print(f"bundle size             {size / 1e9:.2f} GB")
    for name, r in result.graphs.items():
        print(f"  {name:<13} {r.bytes / 1e9:.2f} GB  max abs diff {max(r.max_abs_diff.values()):.1e}  "
              f"{'validated' if r.validated else 'NOT validated'}")  # fmt: skip
    print(f"pipeline max abs diff   {result.pipeline_max_abs_diff:.2e} (64x64, 2 steps)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed UNet steps per runtime (median)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one step with CFG)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ORT")
    parser.add_argument("--keep", type=Path, help="keep the exported unet here (default: a temp folder)")
    parser.add_argument("--tiny", action="store_true", help="smoke test on a tiny UNet of the same shape")
    parser.add_argument("--json", type=Path, help="also write the numbers as JSON")
    parser.add_argument(
        "--full-pipeline", action="store_true", help="whole `export edge` on a full-size pipeline"
    )
    args = parser.parse_args(argv)
    if args.full_pipeline:
        return full_pipeline(args)

    import numpy as np
    import onnxruntime as ort
    import torch
    from diffusers import UNet2DConditionModel
    from routet2i.export.specs import UNET

    torch.set_num_threads(args.threads)
    config = dict(SD21_BASE_UNET)
    if args.tiny:
        config.update(block_out_channels=[32, 32, 64, 64], attention_head_dim=[2, 2, 4, 4], cross_attention_dim=32,
                      layers_per_block=1, norm_num_groups=16)  # fmt: skip
    torch.manual_seed(0)
    t0 = time.perf_counter()
    unet = UNet2DConditionModel(**config).eval()
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DConditionModel (SD2.1-base config{', TINY' if args.tiny else ''}): {n_params:,} parameters "
          f"({n_params / 1e6:.1f}M), built in {build_s:.1f}s")  # fmt: skip
    if not args.tiny and n_params != EXPECTED_PARAMS:
        print(f"WARNING: expected {EXPECTED_PARAMS:,} parameters for SD2.1-base", file=sys.stderr)

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-unet-"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "model.onnx"
    b, lat, seq, dim = args.batch, 64, 77, config["cross_attention_dim"]
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((b, 4, lat, lat)).astype(np.float32),
        "timestep": np.asarray(981.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((b, seq, dim)).astype(np.float32),
    }
    tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}

    class _Unet(
        torch.nn.Module
    ):  # optimum's UNet export: sample, timestep, encoder_hidden_states -> out_sample
        def __init__(self, unet) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    print(f"exporting to {path} (TorchScript exporter, opset {UNET.opset}, dynamic {UNET.dynamic_axes}) ...",
          flush=True)  # fmt: skip
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            _Unet(unet),
            (tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"]),
            str(path),
            input_names=UNET.input_names,
            output_names=UNET.output_names,
            dynamic_axes=UNET.dynamic_axes,
            opset_version=UNET.opset,
            dynamo=False,
            do_constant_folding=True,
        )
    export_s = time.perf_counter() - t0
    export_rss = _max_rss_gb()
    size = sum(p.stat().st_size for p in work.iterdir() if p.is_file())
    problems = UNET.check_graph(path)
    print(f"export: {export_s:.1f}s, files {size / 1e9:.2f} GB ({len(list(work.iterdir()))} files), "
          f"peak RSS so far {export_rss:.1f} GB, spec check: {problems or 'ok'}", flush=True)  # fmt: skip

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.log_severity_level = 3
    t0 = time.perf_counter()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    print(
        f"ORT session (CPU) created in {load_s:.1f}s; timing {args.runs} steps each, interleaved ...",
        flush=True,
    )

    ort_t, torch_t = [], []
    ort_out = torch_out = None
    with torch.no_grad():
        for _ in range(args.runs):
            t0 = time.perf_counter()
            ort_out = session.run(["out_sample"], feeds)[0]
            ort_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            torch_out = unet(
                tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"]
            ).sample.numpy()
            torch_t.append(time.perf_counter() - t0)
    diff = np.abs(ort_out.astype(np.float64) - torch_out)
    rel = float(diff.max() / max(np.abs(torch_out).max(), 1e-12))
    total_rss = _max_rss_gb()
    results = {
        "params": n_params,
        "config": "tiny" if args.tiny else "sd21-base",
        "export_seconds": round(export_s, 1),
        "onnx_bytes": size,
        "peak_rss_gb_after_export": round(export_rss, 2),
        "peak_rss_gb_total": round(total_rss, 2),
        "ort_session_seconds": round(load_s, 1),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": rel,
        "batch": b,
        "latent": [lat, lat],
        "threads": args.threads,
        "runs": args.runs,
        "torch_s_per_step_median": round(statistics.median(torch_t), 3),
        "ort_s_per_step_median": round(statistics.median(ort_t), 3),
        "ort_over_torch": round(statistics.median(ort_t) / statistics.median(torch_t), 3),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
    print("\n== full-size SD2.1-base UNet export (random weights, CPU) ==")
    print(f"parameters              {n_params / 1e6:.1f}M")
    print(f"export time             {export_s:.1f} s")
    print(f"peak memory (max RSS)   {export_rss:.1f} GB after export, {total_rss:.1f} GB overall")
    print(f"ONNX size               {size / 1e9:.2f} GB")
    print(f"ORT vs torch            max abs diff {diff.max():.2e} (relative to max |out| {rel:.2e})")
    print(f"time per UNet step      torch {results['torch_s_per_step_median']:.2f} s, "
          f"ORT {results['ort_s_per_step_median']:.2f} s (batch {b}, 64x64 latents, {args.threads} threads, "
          f"median of {args.runs}, interleaved)")  # fmt: skip
    print(f"ratio ORT / torch       {results['ort_over_torch']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
