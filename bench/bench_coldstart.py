"""Device cold start and footprint: the torch-free runtime vs the torch stack, side by side.

1. Cold start, each in a fresh process, medians over --repeats: ``import`` of the runtime, then the
   sessions ready (``RouterSession`` + ``EdgePipeline``: manifests verified, tokenizers and ONNX Runtime
   sessions created), then the first decision and image; peak RSS (VmHWM) of the process. Rows, interleaved
   per repeat so all see the same machine load and page cache: ``--baseline-sdk`` (another revision's
   ``sdk/``, e.g. the one before the hash and graph caches; it hashes every file at every launch), our
   first launch with an empty user cache (``ROUTET2I_CACHE_DIR``: hashes everything, writes the hash cache
   and ONNX Runtime's optimized graphs), our second launch with that cache, and the anchor: the same edge
   model in diffusers' torch ``StableDiffusionPipeline`` (``import torch, diffusers`` + ``from_pretrained`` +
   the same image). Ratios to the anchor for import + ready and for the total with the first image (goal of
   issue 13: second launch <= 0.5x), and the edge pipeline's own step timings (verify, sessions per graph,
   whether the UNet came from the graph cache). Bundles: the tiny SD2.1 edge bundle, and the full-size
   SD2.1-base UNet bundle that ``bench_edge.py --prepare`` builds and caches (when present), with the router
   bundle ``bench_router_latency.py`` caches (when present).
2. Install size: the distributions the ``edge`` extra pulls vs ``all`` (the dependency closure read from
   the installed metadata of this venv, extras and markers evaluated), with their site-packages sizes.

    .venv/bin/python bench/bench_coldstart.py [--repeats 3] [--skip-full] [--skip-tiny] [--baseline-sdk DIR]

For a before/after comparison: ``git archive REV sdk | tar -x -C /tmp/base`` then ``--baseline-sdk
/tmp/base/sdk``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
check = {"1": True, "0": False}.get(sys.argv[3], sys.argv[3])  # the code before check_hashes modes took a bool
router = RouterSession(sys.argv[1], check_hashes=check) if sys.argv[1] else None
tr = time.perf_counter()
edge = EdgePipeline(sys.argv[2], check_hashes=check)
t2 = time.perf_counter()
if router is not None:
    router.predict_one("a red fox in the snow")
edge("a red fox in the snow", num_inference_steps=1, seed=0, width=int(sys.argv[4]), height=int(sys.argv[4]))
t3 = time.perf_counter()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "diffusers"})
steps = dict(getattr(edge, "timings", {}))
steps["graph_cache"] = getattr(edge.unet, "graph_cache", "-")
print(json.dumps({"import": t1 - t0, "ready": t2 - t1, "router_ready": tr - t1, "edge_ready": t2 - tr,
                  "first": t3 - t2, "rss_mb": hwm_mb(), "heavy": heavy, "steps": steps}))
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


def _child(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=1800
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["total"] = out["import"] + out["ready"] + out["first"]
    out["imp_ready"] = out["import"] + out["ready"]
    return out


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _baseline_env(baseline_sdk: Path | None, tmp: Path) -> dict[str, str] | None:
    """PYTHONPATH that makes ``import routet2i`` load ``baseline_sdk`` (an ``sdk/`` folder of another
    revision, e.g. ``git archive HEAD~5 sdk | tar -x -C DIR``) ahead of this checkout."""
    if baseline_sdk is None:
        return None
    link = tmp / "baseline-pkg" / "routet2i"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(baseline_sdk.resolve(), target_is_directory=True)
    return {"PYTHONPATH": str(link.parent)}


def cold_start(
    label: str,
    router: Path | None,
    edge: Path,
    pipeline: Path,
    side: int,
    repeats: int,
    baseline_sdk: Path | None = None,
) -> None:
    """Per repeat, interleaved so all rows see the same machine load and page cache: the baseline revision
    (if given; it hashes every file at every launch), our runtime's first launch with an empty user cache
    (hashes everything, writes the hash cache and ONNX Runtime's optimized graphs), its second launch with
    that cache, and the torch anchor."""
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="coldstart-") as tmp:
        base_env = _baseline_env(baseline_sdk, Path(tmp))
        for i in range(repeats):
            if base_env is not None:
                rows.setdefault("before (baseline sdk, sha256 always)", []).append(
                    _child(DEVICE_CHILD, str(router or ""), str(edge), "1", str(side), env=base_env)
                )
            cache = {"ROUTET2I_CACHE_DIR": str(Path(tmp) / f"user-cache-{i}")}
            args = (str(router or ""), str(edge), "first", str(side))
            rows.setdefault("device, 1st launch (empty cache)", []).append(
                _child(DEVICE_CHILD, *args, env=cache)
            )
            rows.setdefault("device, 2nd launch (cached)", []).append(_child(DEVICE_CHILD, *args, env=cache))
            shutil.rmtree(cache["ROUTET2I_CACHE_DIR"], ignore_errors=True)  # full size: 3.4 GB of graphs
            rows.setdefault("diffusers + torch (anchor)", []).append(
                _child(TORCH_CHILD, str(pipeline), str(side))
            )
    for name, runs in rows.items():
        if name.startswith(("device", "before")):
            assert all(r["heavy"] == [] for r in runs), (
                "the device process imported torch/transformers/diffusers"
            )
    print(f"\ncold start, {label} ({side}x{side}, 1 step), medians of {repeats} fresh processes each:")
    print(f"  {'':<40}{'import':>8}{'ready':>8}{'imp+rdy':>9}{'1st img':>9}{'total':>8}{'peak RSS':>10}")
    for name, runs in rows.items():
        print(f"  {name:<40}{_median(runs, 'import'):7.2f}s{_median(runs, 'ready'):7.2f}s{_median(runs, 'imp_ready'):8.2f}s"
              f"{_median(runs, 'first'):8.2f}s{_median(runs, 'total'):7.2f}s{_median(runs, 'rss_mb'):8.0f}MB")  # fmt: skip
    anchor = rows["diffusers + torch (anchor)"]
    for name, runs in rows.items():
        if name == "diffusers + torch (anchor)":
            continue
        print(f"  {name} / anchor: import+ready {_median(runs, 'imp_ready') / _median(anchor, 'imp_ready'):.2f}x, "
              f"total with the first image {_median(runs, 'total') / _median(anchor, 'total'):.2f}x, "
              f"peak RSS {_median(runs, 'rss_mb') / _median(anchor, 'rss_mb'):.2f}x")  # fmt: skip
    print("  (goal: device 2nd launch / anchor, total with the first image, <= 0.50x)")
    for name in ("device, 1st launch (empty cache)", "device, 2nd launch (cached)"):
        steps = rows[name]
        keys = [k for k in steps[0]["steps"] if k != "graph_cache"]
        detail = ", ".join(f"{k} {statistics.median(r['steps'][k] for r in steps):.2f}s" for k in keys)
        print(f"  {name} edge steps: {detail}; unet graph cache: {steps[0]['steps'].get('graph_cache')}")
    if router is not None:
        for name, runs in rows.items():
            if name.startswith(("device", "before")):
                print(f"  {name}: router session {_median(runs, 'router_ready'):.2f}s + edge pipeline "
                      f"{_median(runs, 'edge_ready'):.2f}s; its first image includes one router decision")  # fmt: skip


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
    ap.add_argument("--skip-tiny", action="store_true", help="only the full-size bundle")
    ap.add_argument(
        "--baseline-sdk",
        type=Path,
        help="also time another revision's sdk/ folder side by side (git archive REV sdk | tar -x -C DIR)",
    )
    args = ap.parse_args()

    install_size()

    from routet2i.export.edge import EdgeExportConfig, export_edge
    from routet2i.training.tiny_models import build_tiny_models

    router = CACHE / "router-untrained"
    router = router if (router / "manifest.json").is_file() else None
    if not args.skip_tiny:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = build_tiny_models(Path(tmp) / "tiny")
            edge = Path(tmp) / "edge"
            export_edge(EdgeExportConfig(pipeline=str(tiny["edge-sd21"]), out=edge, vae_encoder=False))
            cold_start(
                "tiny SD2.1 bundle", router, edge, tiny["edge-sd21"], 64, args.repeats, args.baseline_sdk
            )

    full_edge, full_pipe = CACHE / "sd21-base-fullunet-onnx", CACHE / "sd21-base-fullunet"
    if args.skip_full:
        return
    if not (full_edge / "manifest.json").is_file():
        print(
            f"\n(no full-size bundle at {full_edge}: run bench/bench_edge.py first for the full-size cold start)"
        )
        return
    cold_start(
        "full-size SD2.1-base UNet bundle (3.5 GB)",
        router,
        full_edge,
        full_pipe,
        64,
        args.repeats,
        args.baseline_sdk,
    )


if __name__ == "__main__":
    main()
