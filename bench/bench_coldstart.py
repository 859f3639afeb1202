"""Device cold start and footprint: the torch-free runtime vs the torch stack, side by side.

1. Cold start, each in a fresh process, medians over --repeats: ``import`` of the runtime, then the
   sessions ready (``RouterSession`` + ``EdgePipeline``: manifests verified, tokenizers and ONNX Runtime
   sessions created), then the first decision and image; peak RSS (VmHWM) of the process. Anchor: the same edge
   model in diffusers' torch ``StableDiffusionPipeline`` (``import torch, diffusers`` +
   ``from_pretrained`` + the same image). Bundles: the tiny SD2.1 edge bundle (always), and the full-size
   SD2.1-base UNet bundle that ``bench_edge.py`` caches (when present), with the router bundle
   ``bench_router_latency.py`` caches (else a tiny one made here).
2. Install size: the distributions the ``edge`` extra pulls vs ``all`` (the dependency closure read from
   the installed metadata of this venv, extras and markers evaluated), with their site-packages sizes.

    .venv/bin/python bench/bench_coldstart.py [--repeats 3] [--skip-full]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ROUTET2I_BENCH_CACHE", Path.home() / ".cache" / "routet2i" / "bench"))

# Peak RSS of a child process (VmHWM; ru_maxrss would survive execve from the parent).
CHILD_PRELUDE = r"""
import json, resource, sys, time

def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

DEVICE_CHILD = (
    CHILD_PRELUDE
    + r"""
t0 = time.perf_counter()
from routet2i.edge_pipeline import EdgePipeline
from routet2i.router_runtime import RouterSession
t1 = time.perf_counter()
router = RouterSession(sys.argv[1]) if sys.argv[1] else None
tr = time.perf_counter()
edge = EdgePipeline(sys.argv[2], check_hashes=sys.argv[3] == "1")
t2 = time.perf_counter()
if router is not None:
    router.predict_one("a red fox in the snow")
edge("a red fox in the snow", num_inference_steps=1, seed=0, width=int(sys.argv[4]), height=int(sys.argv[4]))
t3 = time.perf_counter()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "diffusers"})
print(json.dumps({"import": t1 - t0, "ready": t2 - t1, "router_ready": tr - t1, "edge_ready": t2 - tr,
                  "first": t3 - t2, "rss_mb": hwm_mb(), "heavy": heavy}))
"""
)

TORCH_CHILD = (
    CHILD_PRELUDE
    + r"""
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusionPipeline
t1 = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None)
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
with torch.inference_mode():
    pipe("a red fox in the snow", num_inference_steps=1, width=int(sys.argv[2]), height=int(sys.argv[2]),
         generator=torch.Generator().manual_seed(0))
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "ready": t2 - t1, "first": t3 - t2, "rss_mb": hwm_mb()}))
"""
)


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def cold_start(label: str, router: Path | None, edge: Path, pipeline: Path, side: int, repeats: int) -> None:
    device, anchor = [], []
    for _ in range(repeats):  # interleaved: both see the same machine load and page cache
        device.append(_child(DEVICE_CHILD, str(router or ""), str(edge), "1", str(side)))
        anchor.append(_child(TORCH_CHILD, str(pipeline), str(side)))
    assert all(r["heavy"] == [] for r in device), "the device process imported torch/transformers/diffusers"
    print(f"\ncold start, {label} ({side}x{side}, 1 step), medians of {repeats} fresh processes:")
    print(f"  {'':<34}{'import':>9}{'ready':>9}{'imp+ready':>11}{'1st image':>11}{'peak RSS':>11}")
    rows = {"routet2i device (ONNX, no torch)": device, "diffusers + torch (anchor)": anchor}
    for name, runs in rows.items():
        imp, ready = _median(runs, "import"), _median(runs, "ready")
        print(f"  {name:<34}{imp:8.2f}s{ready:8.2f}s{_median([{'x': r['import'] + r['ready']} for r in runs], 'x'):10.2f}s"
              f"{_median(runs, 'first'):10.2f}s{_median(runs, 'rss_mb'):9.0f}MB")  # fmt: skip
    d = _median([{"x": r["import"] + r["ready"]} for r in device], "x")
    a = _median([{"x": r["import"] + r["ready"]} for r in anchor], "x")
    print(f"  ratio anchor / device: import+ready {a / d:.2f}x, peak RSS "
          f"{_median(anchor, 'rss_mb') / _median(device, 'rss_mb'):.2f}x")  # fmt: skip
    if router is not None:
        print(
            f"  device 'ready' = router session {_median(device, 'router_ready'):.2f}s + edge pipeline "
            f"{_median(device, 'edge_ready'):.2f}s (manifests sha256-verified); its first image includes one "
            "router decision"
        )


# ------------------------------------------------------------------------------------------ install size


def _canon(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def closure(root: str, extras: set[str]) -> tuple[dict[str, metadata.Distribution], set[str]]:
    """Installed distributions that ``root[extras]`` pulls (recursively), and the names not installed."""
    from packaging.requirements import Requirement

    found: dict[str, metadata.Distribution] = {}
    missing: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [(root, frozenset(extras))]
    while stack:
        name, ext = stack.pop()
        if (_canon(name), ext) in seen:
            continue
        seen.add((_canon(name), ext))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(_canon(name))
            continue
        found[_canon(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None:
                envs = [{"extra": e} for e in ext] or [{"extra": ""}]
                if not any(req.marker.evaluate(env) for env in envs):
                    continue
            stack.append((req.name, frozenset(req.extras)))
    return found, missing


def _size_mb(dist: metadata.Distribution) -> float:
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return total / 1e6


def install_size() -> None:
    print("\ninstall size (site-packages of this venv, the dependency closure of each extra):")
    sizes = {}
    for extra in ("edge", "all"):
        dists, missing = closure("routet2i", {extra})
        dists.pop("routet2i", None)
        per = sorted(((n, _size_mb(d)) for n, d in dists.items()), key=lambda x: -x[1])
        sizes[extra] = sum(s for _, s in per)
        top = ", ".join(f"{n} {s:.0f}" for n, s in per[:6])
        print(f"  {extra:<5} {len(per):3d} distributions, {sizes[extra]:8.0f} MB   largest (MB): {top}")
        if missing:
            print(f"        not installed here (not counted): {', '.join(sorted(missing))}")
    print(f"  ratio all / edge: {sizes['all'] / sizes['edge']:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-full", action="store_true", help="only the tiny bundle")
    args = ap.parse_args()

    install_size()

    from routet2i.export.edge import EdgeExportConfig, export_edge
    from routet2i.training.tiny_models import build_tiny_models

    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_models(Path(tmp) / "tiny")
        edge = Path(tmp) / "edge"
        export_edge(EdgeExportConfig(pipeline=str(tiny["edge-sd21"]), out=edge, vae_encoder=False))
        router = CACHE / "router-untrained"
        router = router if (router / "manifest.json").is_file() else None
        cold_start("tiny SD2.1 bundle", router, edge, tiny["edge-sd21"], 64, args.repeats)

    full_edge, full_pipe = CACHE / "sd21-base-fullunet-onnx", CACHE / "sd21-base-fullunet"
    if args.skip_full:
        return
    if not (full_edge / "manifest.json").is_file():
        print(
            f"\n(no full-size bundle at {full_edge}: run bench/bench_edge.py first for the full-size cold start)"
        )
        return
    cold_start("full-size SD2.1-base UNet bundle (3.5 GB)", router, full_edge, full_pipe, 64, args.repeats)


if __name__ == "__main__":
    main()
