"""GPU readiness check: one command that proves (or disproves) the GPU path, and writes what it saw.

Sections (each one's result lands in the report as soon as it ends, so a run cut short still reports):
  a. ``unet``: the full-size SD2.1-base UNet (random weights, 512 px = 64x64 latents, batch 2 = one CFG step):
     torch fp16 (SDPA attention) vs ONNX Runtime CUDA EP on the edge export's fp16 graph (``--fp16``: the
     attention score path kept in fp32) and on its ``--optimize --optimize-target gpu --fp16`` graph, each with
     the product's session (``routet2i.ort.OrtModel``: host inputs bound, outputs on the device) and with
     device-resident IO binding (inputs and outputs stay on the GPU), plus TensorRT EP when its libraries
     load. Per-step medians, ratios against torch, and max abs diff against torch fp32.
  b. ``bundles``: ``routet2i export edge`` bundles (``--fp16``, ``--optimize --optimize-target gpu`` and both)
     of an SD2.1-shaped pipeline validated on CUDA: every graph against torch fp32 on the spec's dummy
     inputs, then a whole ``EdgePipeline`` image against the diffusers torch fp32 pipeline on the same
     latents (max abs diff, NaN, black image).
  c. ``cloud``: the cloud batcher through a real loopback gRPC server on the SD3-medium-shaped transformer
     (24 MMDiT blocks, random weights, tiny text encoders and VAE), 1024 px, 2 steps: images/s at
     ``--max-batch`` 1 vs 4 with 8 concurrent clients.
  d. ``router``: the RouteT2I router bundle (all-MiniLM-L6-v2 architecture) on CUDA vs CPU: decision
     latency p50/p99 at batch 1, throughput at batch 32, PRS^ agreement.

Needs on the GPU machine (it installs nothing): a CUDA build of torch, ``onnxruntime-gpu`` (the CUDA EP;
its TensorRT EP also needs TensorRT's libraries), and the project's ``[export,cloud,train]`` dependencies
(diffusers, transformers, optimum-onnx, grpcio). Missing pieces are reported per section, not fatal.

``--tiny`` runs every section on tiny models of the same architectures (CPU when no CUDA is available,
ONNX Runtime's CPU EP standing in for CUDA); ``make test`` runs it (tests/test_gpu_check.py).

    python bench/gpu_check.py --out DIR [--tiny] [--device auto|cuda|cpu] [--only unet,bundles,cloud,router]
                              [--budget-s 420] [--backbone DIR]

Writes DIR/gpu_check.json and DIR/gpu_check.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

SECTIONS = ("unet", "bundles", "cloud", "router")
TINY_UNET = dict(block_out_channels=[32, 32, 64, 64], attention_head_dim=[2, 2, 4, 4], cross_attention_dim=32,
                 layers_per_block=1, norm_num_groups=16)  # fmt: skip
# UNet graph variants, as `routet2i export edge` makes them: (fp16, optimize with target gpu).
UNET_VARIANTS = {"fp16": (True, False), "fp16_optimized": (True, True), "fp32": (False, False)}
BUNDLE_VARIANTS = {
    "fp16": dict(fp16=True),
    "optimize_gpu": dict(optimize=True, optimize_target="gpu"),
    "fp16_optimize_gpu": dict(fp16=True, optimize=True, optimize_target="gpu"),
}
PROMPT_PARTS = (
    ("a red fox", "an old lighthouse", "three astronauts playing chess", "a bowl of ramen", "a city street",
     "a portrait of an elderly fisherman with a weathered face", "two cats", "a glass teapot"),
    ("", "in fresh snow at dawn", "on the moon next to a glowing blue robot and a small dog",
     "in the style of a watercolor painting", "at night in the rain, neon reflections on wet asphalt"),
    ("", ", highly detailed", ", 35mm photo, shallow depth of field, golden hour, award winning"),
)  # fmt: skip


def _prompts(n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b, c = (
            parts[(i * k + i // 7) % len(parts)] for k, parts in zip((1, 3, 5), PROMPT_PARTS, strict=True)
        )
        out.append(" ".join(x for x in (a, b) if x) + c)
    return out


def _ms_stats(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "p50_ms": statistics.median(s),
        "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))],
        "n": len(s),
    }


class Report:
    """The JSON report, rewritten (atomically) after every section, and its markdown rendering."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out = out
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"sections": {}}
        out.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"status": "ok"}
        self.data["sections"][name] = entry
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            yield entry
        except Exception as exc:
            entry["status"] = "error"
            entry["error"] = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:400] if str(exc).strip() else ''}"
            )
            entry["traceback"] = traceback.format_exc().splitlines()[-12:]
            print(f"   {name} FAILED: {entry['error']}", flush=True)
        finally:
            entry["seconds"] = round(time.monotonic() - t0, 2)
            self.write()

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 2)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str)),
                           ("gpu_check.md", render_markdown(self.data))):  # fmt: skip
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


# ------------------------------------------------------------------------------------------------ environment


def environment(device_arg: str) -> dict[str, Any]:
    from importlib import metadata

    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    env["packages"] = {d: version(d) for d in ("torch", "onnxruntime", "onnxruntime-gpu", "onnx", "diffusers",
                                              "transformers", "optimum-onnx", "grpcio", "numpy", "tensorrt")}  # fmt: skip
    import torch

    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count}  # fmt: skip
    if env["cuda_available"]:  # a cuDNN convolution loads cuDNN/cuBLAS into the process for ONNX Runtime too
        x = torch.ones((1, 4, 8, 8), device="cuda")
        torch.nn.functional.conv2d(x, torch.ones((4, 4, 3, 3), device="cuda"))
        torch.cuda.synchronize()
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls") and env["cuda_available"]:
        with contextlib.suppress(Exception):  # CUDA/cuDNN from the nvidia-* wheels torch brought
            ort.preload_dlls()
    env["ort_version"] = ort.__version__
    env["ort_providers"] = list(ort.get_available_providers())
    env["ort_cuda_works"], env["ort_cuda_error"] = _ort_cuda_works()
    env["tensorrt_libs"] = _tensorrt_libs()
    if device_arg == "auto":
        device = "cuda" if env["cuda_available"] and env["ort_cuda_works"] else "cpu"
    else:
        device = device_arg
    env["device"] = device
    env["needs"] = {
        "torch CUDA build": bool(env["torch_cuda"]),
        "onnxruntime-gpu (CUDA EP)": bool(env["ort_cuda_works"]),
        "TensorRT libraries (TensorRT EP)": env["tensorrt_libs"] is True,
    }
    return env


def _ort_cuda_works() -> tuple[bool, str | None]:
    """Create a CUDA EP session on a one-node graph (the provider list alone does not prove it loads)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "CUDAExecutionProvider not in this onnxruntime build (install onnxruntime-gpu)"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    try:
        s = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        if s.get_providers()[0] != "CUDAExecutionProvider":
            return False, f"the session fell back to {s.get_providers()}"
        s.run(None, {"x": np.array([-1.0, 1.0], dtype=np.float32)})
        return True, None
    except Exception as exc:
        return False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        del onnx


def _tensorrt_libs() -> bool | str:
    import ctypes

    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return "libnvinfer.so.10 not found (TensorRT is not installed)"


# ------------------------------------------------------------------------------------------------ a. UNet


def _unet_config(tiny: bool) -> dict[str, Any]:
    from _sd21 import SD21_BASE_UNET

    config = dict(SD21_BASE_UNET)
    if tiny:
        config.update(TINY_UNET)
    return config


def _build_unet(tiny: bool):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)  # CPU init: the same weights in the preparing child and here
    return UNet2DConditionModel(**_unet_config(tiny)).eval()


def _unet_feeds(tiny: bool, batch: int = 2) -> dict[str, Any]:
    import numpy as np

    dim = _unet_config(tiny)["cross_attention_dim"]
    side = 32 if tiny else 64  # latents: 512 px at full size
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, 4, side, side)).astype(np.float32),
        "timestep": np.asarray(981.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, dim)).astype(np.float32),
    }


def prepare_unet(work: Path, tiny: bool) -> None:
    """Child process (CPU only): export the UNet to ONNX, then make each variant as `export edge` does."""
    import torch
    from routet2i.export.edge import _optimize_graph, _to_fp16
    from routet2i.export.specs import UNET

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    times: dict[str, Any] = {}

    def save() -> None:
        (work / ".prepare.json.tmp").write_text(json.dumps(times))
        os.replace(work / ".prepare.json.tmp", work / "prepare.json")

    t0 = time.perf_counter()
    unet = _build_unet(tiny)
    feeds = {k: torch.from_numpy(v) for k, v in _unet_feeds(tiny).items()}

    class _Unet(torch.nn.Module):  # optimum's UNet signature: sample, timestep, encoder_hidden_states
        def __init__(self, unet) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    (work / "fp32").mkdir(parents=True)
    # as in a bundle: the export's fusion choices read unet/config.json
    (work / "fp32" / "config.json").write_text(json.dumps(_unet_config(tiny)))
    with torch.no_grad():
        torch.onnx.export(
            _Unet(unet), (feeds["sample"], feeds["timestep"], feeds["encoder_hidden_states"]),
            str(work / "fp32" / "model.onnx"), input_names=UNET.input_names, output_names=UNET.output_names,
            dynamic_axes=UNET.dynamic_axes, opset_version=UNET.opset, dynamo=False, do_constant_folding=True,
        )  # fmt: skip
    times["export_s"] = round(time.perf_counter() - t0, 1)
    save()
    unet = None
    for name, (fp16, optimize) in UNET_VARIANTS.items():
        if name == "fp32":
            continue
        t0 = time.perf_counter()
        shutil.copytree(work / "fp32", work / name)
        path = work / name / "model.onnx"
        if optimize:
            times[f"{name}_fusions"] = _optimize_graph(path, "unet", "gpu", fp16)
        if fp16:
            _to_fp16(path, "unet")
        times[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        save()
    times["done"] = True
    save()


def _prepared(work: Path) -> dict[str, Any]:
    try:
        return json.loads((work / "prepare.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _start_prepare(work: Path, tiny: bool) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, __file__, "--_prepare-unet", str(work)] + (["--tiny"] if tiny else [])
    log = open(work.parent / "prepare.log", "w")  # noqa: SIM115 - closed with the child
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _time_calls(fn: Callable[[], Any], runs: int, sync: Callable[[], None], warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        ms.append((time.perf_counter() - t0) * 1e3)
    return ms


def section_unet(entry: dict[str, Any], report: Report, prep: subprocess.Popen, work: Path, args) -> None:
    import numpy as np
    import onnxruntime as ort
    import torch
    from routet2i.ort import OrtModel

    cuda = args.device == "cuda"
    dev = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runs = 3 if args.tiny else 10
    feeds = _unet_feeds(args.tiny)
    entry.update(size="tiny" if args.tiny else "SD2.1-base 865.9M params", latents="2x4x32x32 (256 px, CFG)" if args.tiny else "2x4x64x64 (512 px, CFG)",
                 device=dev, runs=runs)  # fmt: skip
    unet = _build_unet(args.tiny)
    entry["params_m"] = round(sum(p.numel() for p in unet.parameters()) / 1e6, 1)
    t = {k: torch.from_numpy(v).to(dev) for k, v in feeds.items()}
    with torch.no_grad():
        unet.to(dev)
        ref = unet(t["sample"], t["timestep"], t["encoder_hidden_states"]).sample.float().cpu().numpy()
        torch_dtype = torch.float16 if cuda else torch.float32
        unet.to(dtype=torch_dtype)
        th = {k: v.to(torch_dtype) for k, v in t.items()}
        attn = type(next(iter(unet.attn_processors.values()))).__name__
        ms = _time_calls(lambda: unet(th["sample"], th["timestep"], th["encoder_hidden_states"]), runs, sync)
        out_t = unet(th["sample"], th["timestep"], th["encoder_hidden_states"]).sample.float().cpu().numpy()
    entry["torch"] = {"dtype": str(torch_dtype).split(".")[-1], "attention": attn, **_ms_stats(ms),
                      "max_abs_diff_vs_fp32": float(np.abs(out_t - ref).max())}  # fmt: skip
    print(f"   torch {entry['torch']['dtype']} ({attn}): {entry['torch']['p50_ms']:.1f} ms/step", flush=True)
    unet = th = t = None  # free the GPU memory before ONNX Runtime takes its own
    if cuda:
        torch.cuda.empty_cache()

    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    entry["ort"] = {}
    order = ["fp16", "fp16_optimized", "fp32"] if cuda else ["fp32", "fp16", "fp16_optimized"]
    for name in order:  # each variant as soon as the child has made it
        key = "export_s" if name == "fp32" else f"{name}_s"
        t0 = time.monotonic()
        while prep.poll() is None and key not in _prepared(work) and report.remaining() > 30:
            time.sleep(1.0)
        entry.setdefault("prepare_wait_s", {})[name] = round(time.monotonic() - t0, 1)
        entry["prepare"] = _prepared(work)
        if key not in entry["prepare"]:
            if prep.poll() not in (None, 0):
                log = (work.parent / "prepare.log").read_text()[-800:]
                raise RuntimeError(f"UNet export child exited {prep.returncode}: {log}")
            entry["ort"][name] = {"status": "skipped", "why": "time budget (export child not done)"}
            continue
        if report.remaining() < (20 if args.tiny else 60):
            entry["ort"][name] = {"status": "skipped", "why": "time budget"}
            continue
        entry["ort"][name] = _ort_unet(work / name / "model.onnx", provider, feeds, ref, runs, ort, OrtModel)
        report.write()
    torch_ms = entry["torch"]["p50_ms"]
    for res in entry["ort"].values():
        for k in ("product", "iobinding"):
            if isinstance(res.get(k), dict):
                res[k]["ratio_vs_torch"] = round(res[k]["p50_ms"] / torch_ms, 3)
    entry["tensorrt"] = _trt_unet(work, feeds, ref, runs, report, args)
    if any(r.get("status") == "error" for r in [*entry["ort"].values(), entry["tensorrt"]]):
        entry["status"] = "failed"


def _ort_unet(path: Path, provider: str, feeds, ref, runs: int, ort, OrtModel) -> dict[str, Any]:
    import numpy as np
    from routet2i.ort import SessionConfig

    res: dict[str, Any] = {"status": "ok", "provider": provider}
    t0 = time.perf_counter()
    try:
        model = OrtModel(path, providers=[provider], config=SessionConfig(graph_cache=False))
    except Exception as exc:
        res.update(status="skipped" if provider == "CPUExecutionProvider" else "error",
                   why=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")  # fmt: skip
        print(f"   ORT {path.parent.name} on {provider}: {res['why']}", flush=True)
        return res
    res["session_s"] = round(time.perf_counter() - t0, 1)
    res["providers"] = model.providers
    out = model(**feeds)["out_sample"]
    res["max_abs_diff_vs_torch_fp32"] = float(np.abs(out - ref).max())
    res["max_abs_ref"] = float(np.abs(ref).max())
    res["finite"] = bool(np.isfinite(out).all())
    res["product"] = _ms_stats(_time_calls(lambda: model(**feeds), runs, lambda: None))
    if provider != "CPUExecutionProvider":  # inputs and output stay on the device
        sess = model.session
        binding = sess.io_binding()
        for name, value in model._feed(feeds).items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output("out_sample", "cuda")

        def run() -> None:
            sess.run_with_iobinding(binding)

        res["iobinding"] = _ms_stats(_time_calls(run, runs, binding.synchronize_outputs))
    print(f"   ORT {path.parent.name} on {provider}: session {res['session_s']} s, product "
          f"{res['product']['p50_ms']:.1f} ms/step"
          + (f", device IO binding {res['iobinding']['p50_ms']:.1f} ms/step" if "iobinding" in res else "")
          + f", max abs diff {res['max_abs_diff_vs_torch_fp32']:.2e}", flush=True)  # fmt: skip
    return res


def _trt_unet(work: Path, feeds, ref, runs: int, report: Report, args) -> dict[str, Any]:
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return {"status": "skipped", "why": "this onnxruntime build has no TensorRT EP"}
    libs = _tensorrt_libs()
    if libs is not True:
        return {"status": "skipped", "why": f"TensorRT EP built in, but {libs}"}
    if args.device != "cuda":
        return {"status": "skipped", "why": "no CUDA device"}
    if report.remaining() < 240:
        return {"status": "skipped", "why": "time budget (a TensorRT engine build of the UNet takes minutes)"}
    from routet2i.ort import OrtModel

    provider = ("TensorrtExecutionProvider", {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                              "trt_engine_cache_path": str(work / "trt-cache")})  # fmt: skip
    return _ort_unet(work / "fp32" / "model.onnx", provider, feeds, ref, runs, ort, OrtModel)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ b. bundles


def _tiny_models(work: Path) -> dict[str, Path]:
    from routet2i.training.tiny_models import build_tiny_models

    if not (work / "tiny" / "edge-sd21").is_dir():
        build_tiny_models(work / "tiny")
    return {k: work / "tiny" / k for k in ("edge-sd21", "cloud-sd3", "clip")}


def section_bundles(entry: dict[str, Any], report: Report, work: Path, args) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from routet2i.edge_pipeline import EdgePipeline
    from routet2i.export.edge import EdgeExportConfig, export_edge

    cuda = args.device == "cuda"
    provider = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
    src = _tiny_models(work)["edge-sd21"]
    entry.update(pipeline="tiny SD2.1-shaped (random weights)", provider=provider, variants={})
    pipe = StableDiffusionPipeline.from_pretrained(src, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size, steps, prompt = 64, 4, "a red fox in the snow"
    latents = np.random.default_rng(0).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    with torch.no_grad():
        ref = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                   latents=torch.from_numpy(latents.copy()), output_type="np").images[0]  # fmt: skip
    # tiny: one bundle (the GPU fusions run in the unet section); full size: all three
    variants = BUNDLE_VARIANTS if not args.tiny else {"fp16": BUNDLE_VARIANTS["fp16"]}
    for name, opts in variants.items():
        res: dict[str, Any] = {"status": "ok"}
        entry["variants"][name] = res
        if report.remaining() < 30:
            res.update(status="skipped", why="time budget")
            continue
        out = work / f"bundle-{name}"
        t0 = time.perf_counter()
        try:
            export_edge(EdgeExportConfig(pipeline=str(src), out=out, vae_encoder=False, **opts))
        except Exception as exc:
            res.update(
                status="error", why=f"export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            )
            continue
        res["export_s"] = round(time.perf_counter() - t0, 1)
        res["graphs"] = _validate_graphs(pipe, out, provider)
        if not all(g.get("passed", True) for g in res["graphs"].values()):
            res["status"] = "failed"
        try:
            edge = EdgePipeline(out, providers=[provider])
            img = edge(prompt, num_inference_steps=steps, guidance_scale=7.5, width=size, height=size,
                       latents=latents.copy(), output_type="np")  # fmt: skip
        except Exception as exc:
            gpu_only = not cuda and "GPU execution providers" in str(exc)
            res.update(status="skipped" if gpu_only else "failed",
                       why=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")  # fmt: skip
            report.write()
            continue
        res["image"] = {
            "providers": edge.providers,
            "max_abs_diff_vs_torch_fp32": float(np.abs(np.asarray(img, np.float64) - ref).max()),
            "finite": bool(np.isfinite(img).all()),
            "std": float(np.std(img)),
            "black": bool(float(np.max(img)) < 0.02),
            "atol": 0.1 if opts.get("fp16") else 2e-3,
        }
        im = res["image"]
        im["passed"] = im["finite"] and not im["black"] and im["max_abs_diff_vs_torch_fp32"] <= im["atol"]
        graphs_ok = all(g.get("passed", True) for g in res["graphs"].values())
        if not (im["passed"] and graphs_ok):
            res["status"] = "failed"
        print(f"   bundle {name}: export {res['export_s']} s, image max abs diff "
              f"{im['max_abs_diff_vs_torch_fp32']:.2e} (atol {im['atol']}), finite {im['finite']}, black "
              f"{im['black']} on {edge.providers[0]} -> {res['status']}", flush=True)  # fmt: skip
        report.write()
    if any(v["status"] in ("failed", "error") for v in entry["variants"].values()):
        entry["status"] = "failed"


def _validate_graphs(pipe, bundle: Path, provider: str) -> dict[str, Any]:
    """Each graph of the bundle on `provider` against torch fp32, on the spec's dummy inputs (batch 1, 2)."""
    import numpy as np
    from routet2i.export.edge import _torch_reference
    from routet2i.export.specs import EDGE_GRAPHS
    from routet2i.ort import OrtModel

    manifest = json.loads((bundle / "manifest.json").read_text())
    fp16 = (manifest.get("edge") or {}).get("dtype") == "float16"
    text = pipe.text_encoder.config
    dims = {"sequence_length": pipe.tokenizer.model_max_length, "vocab": text.vocab_size, "height": 8, "width": 8,
            "latent_height": 8, "latent_width": 8, "image_height": 64, "image_width": 64}  # fmt: skip
    out: dict[str, Any] = {}
    for name in ("text_encoder", "unet", "vae_decoder"):
        spec = EDGE_GRAPHS[name]
        try:
            model = OrtModel(bundle / name / "model.onnx", providers=[provider])
        except Exception as exc:
            out[name] = {
                "status": "skipped",
                "why": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            }
            continue
        diff, finite = 0.0, True
        try:
            for batch in (1, 2):
                feeds = spec.dummy_inputs({**dims, "batch_size": batch},
                                          {"encoder_hidden_states.2": text.hidden_size}, seed=batch)  # fmt: skip
                got = model(**feeds)
                want = _torch_reference(pipe, name, feeds)
                for k, v in want.items():
                    finite &= bool(np.isfinite(got[k]).all())
                    diff = max(diff, float(np.abs(got[k].astype(np.float64) - v).max()))
        except Exception as exc:
            out[name] = {"providers": model.providers, "passed": False, "status": "error",
                         "why": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}  # fmt: skip
            continue
        atol = spec.fp16_atol if fp16 else spec.atol
        out[name] = {"providers": model.providers, "max_abs_diff": diff, "atol": atol, "finite": finite,
                     "passed": finite and diff <= atol}  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------------ c. cloud


def section_cloud(entry: dict[str, Any], report: Report, work: Path, args) -> None:
    from bench_cloud import _full_size_factory, _throughput
    from routet2i.cloud_server import open_store
    from routet2i.cloud_server.pipelines import SD3Pipeline

    tiny = _tiny_models(work)["cloud-sd3"]
    device = "cuda" if args.device == "cuda" else "cpu"
    if args.tiny:
        px, n_requests, repeats = 64, 8, 1
        pipe = SD3Pipeline(str(tiny), device=device)
        pipe.default_size = px
    else:
        px, n_requests, repeats = 1024, 16, 2
        pipe = _full_size_factory(tiny, 24, px)()
    transformer = pipe.pipe.transformer
    entry.update(transformer_params_b=round(sum(p.numel() for p in transformer.parameters()) / 1e9, 3),
                 px=px, steps=2, concurrency=8, requests=n_requests, device=str(pipe.device),
                 dtype=str(transformer.dtype).split(".")[-1])  # fmt: skip
    store = open_store(f"sqlite:///{work / 'cloud.db'}")
    token = store.add_device("gpu-check", quota=10**9, period="total")
    try:
        for mb in (1, 4):
            rates = [_throughput(pipe, store, token, mb, n_requests, 2) for _ in range(repeats)]
            entry[f"max_batch_{mb}_images_per_s"] = statistics.median(rates)
            entry[f"max_batch_{mb}_passes"] = rates
            print(f"   --max-batch {mb}: {statistics.median(rates):.2f} images/s", flush=True)
            report.write()
    finally:
        store.close()
    entry["batching_speedup"] = entry["max_batch_4_images_per_s"] / entry["max_batch_1_images_per_s"]
    if device == "cuda":
        import torch

        entry["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)


# ------------------------------------------------------------------------------------------------ d. router


def _tiny_backbone(work: Path) -> str:
    """A 2-layer, 64-wide BERT config beside the packaged all-MiniLM-L6-v2 tokenizer (random weights)."""
    from routet2i.training.model import resolve_backbone
    from transformers import BertConfig

    src, folder = Path(resolve_backbone("")), work / "backbone-tiny-config"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
    vocab = sum(1 for _ in (src / "vocab.txt").open(encoding="utf-8"))
    BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=128).save_pretrained(folder)  # fmt: skip
    return str(folder)


def _router_bundle(work: Path, backbone: str | None) -> tuple[Path, str]:
    import torch
    from routet2i.training.cli import main as routet2i_main
    from routet2i.training.metrics import load_metric_pairs
    from routet2i.training.model import RouterConfig, RouteT2IRouter, save_router

    what, hidden = "packaged all-MiniLM-L6-v2 (trained weights)", 384
    if backbone and not any(
        (Path(backbone) / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")
    ):
        from transformers import AutoConfig, AutoModel

        cfg = AutoConfig.from_pretrained(backbone)  # a config + tokenizer without weights: random weights
        torch.manual_seed(0)
        folder = work / "backbone-random"
        AutoModel.from_config(cfg).save_pretrained(folder)
        for f in Path(backbone).iterdir():
            if f.is_file() and not (folder / f.name).exists():
                shutil.copyfile(f, folder / f.name)
        backbone, what = (
            str(folder),
            f"{cfg.model_type} {cfg.num_hidden_layers}x{cfg.hidden_size} (random weights)",
        )
        hidden = cfg.hidden_size
    elif backbone:
        what = backbone
    metrics = [p.metric for p in load_metric_pairs()]
    config = RouterConfig(metrics=metrics, backbone=backbone or "", hidden_size=hidden)
    torch.manual_seed(0)
    router = RouteT2IRouter(config).eval()
    save_router(
        work / "router-ckpt", router, config, config.backbone, method="routet2i", metrics=metrics,
        weights=[1.0] * len(metrics), gamma=0.5, edge_model="sd21-base", cloud_model="sd3-medium",
        dataset="untrained", calibration=[{"rate": 0.3, "alpha": 0.5}, {"rate": 0.5, "alpha": 0.55}],
    )  # fmt: skip
    out = work / "router-bundle"
    code = routet2i_main(
        ["export", "router", "--router", str(work / "router-ckpt"), "--out", str(out), "--force"]
    )
    if code != 0:
        raise RuntimeError(f"routet2i export router exited {code}")
    return out, what


def section_router(entry: dict[str, Any], report: Report, work: Path, args) -> None:
    import numpy as np
    from routet2i.router_runtime import RouterSession

    bundle, what = _router_bundle(work, args.backbone or (_tiny_backbone(work) if args.tiny else None))
    prompts = _prompts(60 if args.tiny else 300)
    providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if args.device == "cuda" else [])
    entry.update(backbone=what, prompts=len(prompts), results={})
    prs = {}
    sessions = {p: RouterSession(bundle, providers=[p]) for p in providers}
    for s in sessions.values():
        for q in prompts[:10]:
            s.predict_one(q)
    times: dict[str, list[float]] = {p: [] for p in sessions}
    for i, q in enumerate(prompts):  # interleaved, order alternating: both see the same machine load
        for p in providers if i % 2 == 0 else providers[::-1]:
            t0 = time.perf_counter()
            sessions[p].predict_one(q)
            times[p].append((time.perf_counter() - t0) * 1e3)
    for p, s in sessions.items():
        prs[p] = np.concatenate([x.reshape(len(prompts[:64]), -1) for x in s.predict(prompts[:64])], axis=1)
        batch = prompts[:32]
        ms = _time_calls(lambda s=s, batch=batch: s.predict(batch), 5, lambda: None)
        entry["results"][p] = {"providers": s.providers, "batch1": _ms_stats(times[p]),
                               "batch32_prompts_per_s": 32 / (statistics.median(ms) / 1e3)}  # fmt: skip
        r = entry["results"][p]
        print(f"   router on {p}: p50 {r['batch1']['p50_ms']:.2f} ms, p99 {r['batch1']['p99_ms']:.2f} ms, "
              f"batch 32 {r['batch32_prompts_per_s']:.0f} prompts/s", flush=True)  # fmt: skip
    if "CUDAExecutionProvider" in sessions:
        cpu, gpu = entry["results"]["CPUExecutionProvider"], entry["results"]["CUDAExecutionProvider"]
        entry["p50_ratio_cuda_vs_cpu"] = gpu["batch1"]["p50_ms"] / cpu["batch1"]["p50_ms"]
        entry["batch32_speedup_cuda_vs_cpu"] = gpu["batch32_prompts_per_s"] / cpu["batch32_prompts_per_s"]
        # PRS^ and the per-metric scores of 64 prompts (an untrained router's PRS^ can be nearly constant)
        entry["outputs_max_abs_diff_cuda_vs_cpu"] = float(
            np.abs(prs["CUDAExecutionProvider"] - prs["CPUExecutionProvider"]).max()
        )
        entry["outputs_std_cpu"] = float(prs["CPUExecutionProvider"].std(axis=0).mean())


# ------------------------------------------------------------------------------------------------ report


def render_markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = ["# GPU check report", ""]
    lines.append(f"- mode: {'tiny' if data.get('tiny') else 'full size'}, device: {env.get('device')}, "
                 f"elapsed {data.get('elapsed_s')} s")  # fmt: skip
    if env:
        gpu = env.get("gpu") or {}
        lines.append(f"- GPU: {gpu.get('name', 'none')} ({gpu.get('memory_gib', '-')} GiB); torch "
                     f"{env['packages'].get('torch')} (CUDA {env.get('torch_cuda')}); onnxruntime {env.get('ort_version')} "
                     f"providers {', '.join(env.get('ort_providers', []))}")  # fmt: skip
        lines.append(
            "- needs: " + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in env.get("needs", {}).items())
        )
        if env.get("ort_cuda_error"):
            lines.append(f"- CUDA EP: {env['ort_cuda_error']}")
    secs = data.get("sections", {})
    for name, s in secs.items():
        lines += ["", f"## {name}: {s.get('status')} ({s.get('seconds')} s)"]
        if s.get("error"):
            lines.append(f"error: `{s['error']}`")
        if name == "unet" and "torch" in s:
            lines += ["", "| runtime | graph | ms/step p50 | p99 | vs torch | max abs diff vs torch fp32 |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            t = s["torch"]
            lines.append(f"| torch {t['dtype']} ({t['attention']}) | - | {t['p50_ms']:.2f} | {t['p99_ms']:.2f} | 1.00 | "
                         f"{t['max_abs_diff_vs_fp32']:.2e} |")  # fmt: skip
            for g, r in s.get("ort", {}).items():
                if r.get("status") != "ok":
                    lines.append(f"| ORT | {g} | {r.get('status')}: {r.get('why', '')} | | | |")
                    continue
                for k in ("product", "iobinding"):
                    if k in r:
                        lines.append(f"| ORT {r['providers'][0]} ({'OrtModel' if k == 'product' else 'device IO binding'}) "
                                     f"| {g} | {r[k]['p50_ms']:.2f} | {r[k]['p99_ms']:.2f} | {r[k].get('ratio_vs_torch', 0):.2f} "
                                     f"| {r['max_abs_diff_vs_torch_fp32']:.2e} |")  # fmt: skip
            trt = s.get("tensorrt", {})
            lines.append(f"\nTensorRT EP: {trt.get('status')} {trt.get('why', '')}")
        elif name == "bundles":
            lines += ["", "| bundle | graphs (max abs diff / atol) | image max abs diff | finite | black | status |",
                      "|---|---|---|---|---|---|"]  # fmt: skip
            for v, r in s.get("variants", {}).items():
                graphs = ", ".join(f"{g}: {x['max_abs_diff']:.1e}/{x['atol']:.0e}" if "max_abs_diff" in x else f"{g}: {x.get('status')}"
                                   for g, x in r.get("graphs", {}).items())  # fmt: skip
                im = r.get("image", {})
                lines.append(f"| {v} | {graphs} | {im.get('max_abs_diff_vs_torch_fp32', '-')} | {im.get('finite', '-')} "
                             f"| {im.get('black', '-')} | {r['status']} {r.get('why', '')} |")  # fmt: skip
        elif name == "cloud" and "max_batch_1_images_per_s" in s:
            lines.append(f"\n{s['transformer_params_b']} B-parameter transformer ({s['dtype']}) on {s['device']}, "
                         f"{s['px']} px, {s['steps']} steps, concurrency {s['concurrency']}: --max-batch 1 "
                         f"{s['max_batch_1_images_per_s']:.2f} images/s, --max-batch 4 "
                         f"{s.get('max_batch_4_images_per_s', float('nan')):.2f} images/s, speed-up "
                         f"{s.get('batching_speedup', float('nan')):.2f}x")  # fmt: skip
        elif name == "router" and s.get("results"):
            lines += ["", f"backbone: {s['backbone']}", "", "| provider | p50 ms | p99 ms | batch 32 prompts/s |",
                      "|---|---|---|---|"]  # fmt: skip
            for p, r in s["results"].items():
                lines.append(f"| {p} | {r['batch1']['p50_ms']:.2f} | {r['batch1']['p99_ms']:.2f} | "
                             f"{r['batch32_prompts_per_s']:.0f} |")  # fmt: skip
            if "outputs_max_abs_diff_cuda_vs_cpu" in s:
                lines.append(f"\nPRS^ and metric scores, max abs diff CUDA vs CPU: "
                             f"{s['outputs_max_abs_diff_cuda_vs_cpu']:.2e} (their std over prompts "
                             f"{s['outputs_std_cpu']:.2e})")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.md (required)")
    ap.add_argument("--tiny", action="store_true", help="tiny models of the same architectures (CPU is fine)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma list of sections ({', '.join(SECTIONS)})"
    )
    ap.add_argument("--budget-s", type=float, default=None, help="time budget; later parts skip when short")
    ap.add_argument("--backbone", help="router backbone folder (config + tokenizer without weights: random)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temp folder, removed at the end)")
    ap.add_argument("--_prepare-unet", dest="prepare_unet", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.prepare_unet:
        prepare_unet(args.prepare_unet, args.tiny)
        return 0
    if args.out is None:
        ap.error("--out DIR is required (the report is written there)")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = sorted(set(only) - set(SECTIONS))
    if bad:
        ap.error(f"--only {','.join(bad)}: allowed {', '.join(SECTIONS)}")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"--out {args.out}: exists and is not a folder")
    import logging

    logging.basicConfig(level=logging.WARNING)
    report = Report(args.out, args.budget_s or (300.0 if args.tiny else 460.0))
    report.data["tiny"] = args.tiny
    report.data["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        report.data["environment"] = env = environment(args.device)
        args.device = env["device"]
        print(f"device {args.device}; " + json.dumps(env.get("needs")), flush=True)
        report.write()
        (work / "unet").mkdir(exist_ok=True)
        prep = _start_prepare(work / "unet", args.tiny) if "unet" in only else None
        for name, fn in (("router", section_router), ("cloud", section_cloud), ("bundles", section_bundles)):
            if name in only:
                with report.section(name) as entry:
                    fn(entry, report, work, args)
        if prep is not None:
            with report.section("unet") as entry:
                section_unet(entry, report, prep, work / "unet", args)
            if prep.poll() is None:
                prep.kill()
    finally:
        report.write()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    statuses = {n: s["status"] for n, s in report.data["sections"].items()}
    print(f"report: {args.out / 'gpu_check.md'}; sections: {statuses}", flush=True)
    return 1 if {"error", "failed"} & set(statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
