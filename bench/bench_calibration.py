"""Online calibration vs the bundle's static table: does the device hold the operator's cloud rate on its
own traffic?

One real router bundle (the product's pair, trained and exported by the project's own CLI, cached outside
the repo; or ``--router-bundle DIR``), one `EdgeClient` per target rate with no edge and no cloud: a
stream of 1,200 Parti prompts, then, with the same client (same state file), 1,200 DiffusionDB user prompts
(both shuffled with a fixed seed from ../shared/data/prompts). Every prompt goes through
``EdgeClient.route()``; a prompt the router wants in the cloud shows as ``reason == "cloud_unavailable"``
(no cloud configured) or ``route == "cloud"``. Measured: the share of wanted-cloud prompts over prompts
401-1,200 of each stream (after the 500-prompt window has refilled from the other stream... mostly), for
``calibration = "online"`` (the default) and ``"static"`` side by side. Goal: online within 0.03 of the
target on both streams for 0.1, 0.3 and 0.5.

The router's PRS^ is computed once per prompt (memoised; the ONNX router is deterministic), so the six runs
cost one inference per prompt; the first pass times 2,400 real ``route()`` calls (router inference, policy,
state-file transaction) and prints their median and total.

    .venv/bin/python bench/bench_calibration.py [--router-bundle DIR] [--targets 0.1,0.3,0.5] [--json OUT]

Router when none is given (built once, about 3-5 min on 2 CPU cores):
    routet2i train --table ../shared/data/quality/evalmi50k_dev.csv --dataset evalmi50k \\
        --edge-model sd_v2-1 --cloud-model sd3_5_large --out ~/.cache/routet2i-bench/router-ckpt
    routet2i export router --router ~/.cache/routet2i-bench/router-ckpt --out ~/.cache/routet2i-bench/router \\
        --target-rate 0.3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("ROUTET2I_SHARED_DATA", REPO.parent / "shared" / "data"))
PARTI = SHARED / "prompts" / "parti" / "PartiPrompts.tsv"
DIFFUSIONDB = SHARED / "prompts" / "diffusiondb_imagereward" / "refl_data.json"
TABLE = SHARED / "quality" / "evalmi50k_dev.csv"
CACHE = Path(os.environ.get("ROUTET2I_BENCH_CACHE", Path.home() / ".cache" / "routet2i-bench"))
N = 1200  # prompts per stream
FROM = 400  # the rate is measured over prompts FROM+1 .. N of each stream
TOLERANCE = 0.03


def _parti() -> list[str]:
    rows = PARTI.read_text(encoding="utf-8").splitlines()[1:]
    return [r.split("\t")[0].strip() for r in rows if r.split("\t")[0].strip()]


def _diffusiondb() -> list[str]:
    return [
        d["text"].strip() for d in json.loads(DIFFUSIONDB.read_text(encoding="utf-8")) if d["text"].strip()
    ]


def _stream(prompts: list[str], seed: int | None) -> list[str]:
    prompts = list(dict.fromkeys(prompts))  # a device sees repeats, but the benchmark counts distinct prompts
    if seed is not None:  # None: file order (Parti is sorted by category: a drifting stream)
        random.Random(seed).shuffle(prompts)
    if len(prompts) < N:
        sys.exit(f"bench_calibration: only {len(prompts)} distinct prompts, {N} needed")
    return prompts[:N]


def _routet2i(*argv: str) -> None:
    exe = Path(sys.executable).with_name("routet2i")
    cmd = [str(exe), *argv]
    print("$ routet2i " + " ".join(argv), file=sys.stderr, flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if subprocess.run(cmd, env=env).returncode != 0:
        sys.exit(f"bench_calibration: `routet2i {' '.join(argv)}` failed")


def default_router() -> Path:
    """The product's pair (sd_v2-1 -> sd3_5_large on EvalMi-50K), trained and exported with the CLI's
    defaults, once (cached under ``$ROUTET2I_BENCH_CACHE`` or ~/.cache/routet2i-bench)."""
    out = CACHE / "router"
    if (out / "manifest.json").is_file():
        return out
    if not TABLE.is_file():
        sys.exit(f"bench_calibration: {TABLE} not found (../shared/data is not part of the repo)")
    ckpt = CACHE / "router-ckpt"
    if not (ckpt / "router.pt").exists():
        _routet2i("train", "--table", str(TABLE), "--dataset", "evalmi50k", "--edge-model", "sd_v2-1",
                  "--cloud-model", "sd3_5_large", "--out", str(ckpt), "--force")  # fmt: skip
    _routet2i("export", "router", "--router", str(ckpt), "--out", str(out), "--target-rate", "0.3")
    return out


class MemoRouter:
    """A loaded `RouterSession` whose answers are kept per prompt (the ONNX router is deterministic)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.routing = session.routing
        self.cache: dict[str, tuple[float, list[float]]] = {}

    def predict_one(self, prompt: str) -> tuple[float, list[float]]:
        if prompt not in self.cache:
            prs, scores = self.session.predict_one(prompt)
            self.cache[prompt] = (float(prs), [float(s) for s in scores])
        return self.cache[prompt]


def run_stream(client: Any, prompts: list[str]) -> tuple[list[bool], list[float], list[float]]:
    wanted, alphas, seconds = [], [], []
    for p in prompts:
        t0 = time.perf_counter()
        d = client.route(p)
        seconds.append(time.perf_counter() - t0)
        wanted.append(d.route == "cloud" or d.reason == "cloud_unavailable")
        alphas.append(d.alpha)
    return wanted, alphas, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router-bundle", type=Path, help="router bundle (default: the product's pair, cached)")
    p.add_argument("--targets", default="0.1,0.3,0.5", help="target cloud rates (default 0.1,0.3,0.5)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the two streams")
    p.add_argument("--file-order", action="store_true", help="no shuffle: the prompt files' order")
    p.add_argument("--json", type=Path, default=CACHE / "bench_calibration.json", help="JSON report path")
    args = p.parse_args(argv)
    for f in (PARTI, DIFFUSIONDB):
        if not f.is_file():
            sys.exit(f"bench_calibration: {f} not found (../shared/data is not part of the repo)")
    targets = [float(t) for t in args.targets.split(",")]
    bundle = args.router_bundle or default_router()

    import logging

    logging.getLogger("routet2i.router_runtime").setLevel(
        logging.ERROR
    )  # long DiffusionDB prompts: truncated
    from routet2i.client import EdgeClient
    from routet2i.router_runtime import RouterSession

    seed = None if args.file_order else args.seed
    streams = {"parti": _stream(_parti(), seed), "diffusiondb": _stream(_diffusiondb(), seed)}
    t0 = time.perf_counter()
    router = MemoRouter(RouterSession(bundle))
    load_s = time.perf_counter() - t0
    routing = router.routing
    print(f"router {bundle} ({routing.get('router_version')}, {routing.get('edge_model')} -> "
          f"{routing.get('cloud_model')}, table target {routing.get('target_rate')}), loaded in {load_s:.1f} s")  # fmt: skip

    results: dict[str, Any] = {}
    first_pass: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="routet2i-bench-cal-") as work:
        for mode in ("online", "static"):
            for target in targets:
                state = Path(work) / f"{mode}-{target}.json"
                client = EdgeClient(
                    router=router, target_cloud_rate=target, state_file=str(state), decision_log="",
                    calibration=mode,
                )  # fmt: skip
                row: dict[str, Any] = {}
                all_seconds = []
                for name, prompts in streams.items():
                    wanted, alphas, seconds = run_stream(client, prompts)
                    all_seconds += seconds
                    tail = wanted[FROM:]
                    row[name] = {
                        "rate_401_1200": sum(tail) / len(tail),
                        "rate_1_400": sum(wanted[:FROM]) / FROM,
                        "rate_per_100": [sum(wanted[i : i + 100]) / 100 for i in range(0, N, 100)],
                        "alpha_last": alphas[-1],
                    }
                if not first_pass:  # the first run computed every PRS^: real router inference per call
                    first_pass = {
                        "calls": len(all_seconds),
                        "total_s": sum(all_seconds),
                        "median_ms": 1000 * statistics.median(all_seconds),
                        "state_file_bytes": state.stat().st_size,
                    }
                results.setdefault(mode, {})[str(target)] = row
        # the policy alone (PRS^ memoised): what route() costs on top of the router
        client = EdgeClient(router=router, target_cloud_rate=0.3, state_file=str(Path(work) / "t.json"),
                            decision_log="")  # fmt: skip
        _, _, secs = run_stream(client, streams["parti"] + streams["diffusiondb"])
        policy_ms = 1000 * statistics.median(secs)

    print(f"\n{first_pass['calls']} route() calls with router inference: {first_pass['total_s']:.1f} s "
          f"(median {first_pass['median_ms']:.2f} ms/call); policy + state file alone: median "
          f"{policy_ms:.3f} ms/call (state file {first_pass['state_file_bytes']} bytes)")  # fmt: skip
    print(f"\nshare of prompts the router wants in the cloud, prompts {FROM + 1}-{N} of each stream "
          f"(goal: online within {TOLERANCE} of the target)")  # fmt: skip
    print(f"{'target':>6}  {'stream':<11}  {'online':>7}  {'|err|':>6}  {'static':>7}  {'|err|':>6}  goal")
    ok_all = True
    for target in targets:
        for name in streams:
            on = results["online"][str(target)][name]["rate_401_1200"]
            st = results["static"][str(target)][name]["rate_401_1200"]
            ok = abs(on - target) <= TOLERANCE
            ok_all &= ok
            print(f"{target:>6.2f}  {name:<11}  {on:>7.3f}  {abs(on - target):>6.3f}  {st:>7.3f}  "
                  f"{abs(st - target):>6.3f}  {'met' if ok else 'MISSED'}")  # fmt: skip
    print(f"\ngoal {'met' if ok_all else 'MISSED'} for every target and stream")
    print("\nonline, share wanted in the cloud per 100 prompts (the transient after each stream starts):")
    for target in targets:
        for name in streams:
            per = results["online"][str(target)][name]["rate_per_100"]
            print(f"{target:>6.2f}  {name:<11}  " + " ".join(f"{x:.2f}" for x in per))
    report = {
        "router_bundle": str(bundle),
        "router_version": routing.get("router_version"),
        "streams": {k: len(v) for k, v in streams.items()},
        "measured_over": [FROM + 1, N],
        "tolerance": TOLERANCE,
        "seed": seed,
        "results": results,
        "goal_met": ok_all,
        "route_calls": first_pass,
        "policy_median_ms": policy_ms,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
