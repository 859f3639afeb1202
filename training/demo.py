"""The demo: the whole product on one machine in a few minutes, with a router whose decisions are real.

Built ONCE and cached (``$ROUTET2I_DEMO_CACHE`` or ``~/.cache/routet2i/demo-v3``):

1. tiny SD2.1 / SD3 folders with the real architectures (`routet2i dev tiny-models`);
2. an N-model router (`routet2i train` with two ``--cloud-model``, real all-MiniLM-L6-v2 backbone) trained on
   the table shipped beside this file, ``genai_bench_demo.csv``: GenAI-Bench's 527 prompts with their human
   alignment ratings (3 raters, 1-5) for SD 2.1 (the edge model), SDXL base (a cheap cloud tier, 1 quota
   unit per image) and DALL-E 3 (a dear one, 3 units), Apache-2.0 (attribution in
   ``genai_bench_demo_NOTICE.txt``), exported with those costs (`routet2i export router --costs`);
3. the edge bundle of the tiny SD2.1 (`routet2i export edge`).

Each run then starts a loopback cloud server serving two models (``--pipeline SDXL_Base=... --pipeline
DALLE_3=...``: two tiny SD3 pipelines, one batcher each, charged 1 and 3 units; SQLite store in a temp folder)
with a demo device and routes prompts through a real `EdgeClient` at a budget of `DEMO_BUDGET` units per
prompt. The routing is real: for each prompt the router predicts each model's human rating and the policy
picks the edge, SDXL base or DALL-E 3 at the budget. The images are not: tiny random-weight models make noise.

Needs the full install (`pip install 'routet2i[all]'`): it trains and exports with torch. The workstation
side of the project (the device package `routet2i` never imports it): ``routet2i dev demo --prompts FILE``
(``make demo``) prints the routing table; ``edge-generate --demo`` is a thin launcher that runs
``python -m routet2i.training.demo edge-generate ARGS`` in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError

logger = logging.getLogger(__name__)

RECIPE = "demo-v3"  # bump when the recipe changes: a new cache folder is built
TABLE = Path(__file__).with_name("genai_bench_demo.csv")  # derived from GenAI-Bench (Apache-2.0): see NOTICE
DATASET = "genai_bench_527"
EDGE_MODEL = "SDXL_2_1"  # GenAI-Bench's name for Stable Diffusion 2.1
# the cloud tiers and their quota units per image: SDXL base 1.0 (cheap) and DALL-E 3 (dear)
CLOUD_COSTS = {"SDXL_Base": 1, "DALLE_3": 3}
CLOUD_MODEL = next(iter(CLOUD_COSTS))  # the server's default model (a request that names none)
DEMO_BUDGET = 1.0  # average cloud units per prompt
DEMO_DEVICE = "demo-device"
DEMO_QUOTA = 1000
NOISE_NOTE = (
    "note: the routing is real (a MiniLM router trained on GenAI-Bench human ratings of SD 2.1, SDXL base "
    "and DALL-E 3 on 527 prompts); the images are noise (tiny random-weight SD2.1 / SD3 stand-ins for all "
    "three): the demo shows the decisions and the machinery (router, policy, gRPC cloud, quotas in units, "
    "fallbacks), not image quality."
)


def default_cache_dir() -> Path:
    env = os.environ.get("ROUTET2I_DEMO_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "routet2i" / RECIPE


def _routet2i(argv: list[str]) -> None:
    """Run one `routet2i` subcommand in-process (the CLI is the contract the demo exercises)."""
    from routet2i.training.cli import main

    logger.info("routet2i %s", " ".join(argv))
    with contextlib.redirect_stdout(sys.stderr):  # build chatter on stderr: stdout is the demo's table
        rc = main(argv)
    if rc != 0:
        raise RuntimeError(f"`routet2i {' '.join(argv)}` failed with exit code {rc}")


# Third-party chatter (torch export warnings, diffusers' "Multiple distributions found for package optimum",
# loading bars) goes to a log file in the cache unless the command was given -v.
VERBOSE = 0


@contextlib.contextmanager
def _hush(log: Path) -> Iterator[None]:
    """Send everything written to stdout/stderr (Python and C level) and every warning to ``log`` while
    building or starting the demo, unless `VERBOSE`."""
    if VERBOSE:
        yield
        return
    for var in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(var, "error")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (
            open(log, "a") as f,
            warnings.catch_warnings(),
            contextlib.redirect_stdout(f),
            contextlib.redirect_stderr(f),
        ):
            warnings.simplefilter("ignore")
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[Path]:
    """Build into a temp folder beside ``final``; rename on success, so a cache entry is whole or absent."""
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_demo(cache_dir: Path | None = None, *, quiet: bool = False) -> dict[str, Path]:
    """Build (once) and return {"models", "edge_pipeline", "cloud_pipeline", "table", "router_ckpt",
    "router", "edge"}: everything the demo needs, cached under ``cache_dir``."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError(
            "--demo trains and exports tiny models and needs the full install: pip install 'routet2i[all]' "
            "(on a device, use --config routet2i.toml instead)"
        ) from None
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "models": root / "models",
        "table": TABLE,
        "router_ckpt": root / "router-ckpt",
        "router": root / "bundles" / "router",
        "edge": root / "bundles" / "edge",
    }
    stamp = root / "ready.json"
    log = root / "build.log"
    sys.stderr.flush()
    err = os.dup(2)  # progress lines reach the terminal while the build's own output goes to the log

    def say(msg: str) -> None:
        if not quiet:
            os.write(err, (msg + "\n").encode())

    try:
        with _build_lock(root):  # two demos started at once: the second waits, then finds the cache
            if stamp.exists():
                return _build_locked(root, paths, stamp, say)
            with _hush(log):
                try:
                    return _build_locked(root, paths, stamp, say)
                except RuntimeError as exc:
                    raise RuntimeError(f"{exc} (its output is in {log}; -v shows it)") from None
    finally:
        os.close(err)


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock
        yield
        return
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_locked(root: Path, paths: dict[str, Path], stamp: Path, say: Any) -> dict[str, Path]:
    t0 = time.perf_counter()
    if not stamp.exists():
        say(f"demo: building tiny models, the router and bundles once under {root} ...")
    if not paths["models"].exists():
        from routet2i.training.tiny_models import build_tiny_models

        with _staged(paths["models"]) as tmp:
            build_tiny_models(tmp)
    models = {"edge_pipeline": paths["models"] / "edge-sd21", "cloud_pipeline": paths["models"] / "cloud-sd3"}
    if not paths["router_ckpt"].exists():
        say(
            f"demo: training the router on GenAI-Bench ratings ({EDGE_MODEL} = SD 2.1 on the edge; "
            f"{', '.join(CLOUD_COSTS)} in the cloud) ..."
        )
        clouds = [arg for name in CLOUD_COSTS for arg in ("--cloud-model", name)]
        with _staged(paths["router_ckpt"]) as tmp:
            _routet2i(
                ["train", "--table", str(paths["table"]), "--dataset", DATASET, "--edge-model", EDGE_MODEL,
                 *clouds, "--out", str(tmp), "--force"]
            )  # fmt: skip
    if not paths["router"].exists():
        say("demo: exporting the router bundle ...")
        costs = ",".join(f"{name}={units}" for name, units in CLOUD_COSTS.items())
        with _staged(paths["router"]) as tmp:
            _routet2i(
                ["export", "router", "--router", str(paths["router_ckpt"]), "--out", str(tmp), "--costs", costs,
                 "--budget", str(DEMO_BUDGET)]
            )  # fmt: skip
    if not paths["edge"].exists():
        say("demo: exporting the edge bundle ...")
        with _staged(paths["edge"]) as tmp:
            _routet2i(["export", "edge", "--pipeline", str(models["edge_pipeline"]), "--out", str(tmp)])
    if not stamp.exists():
        stamp.write_text(json.dumps({"recipe": RECIPE, "built_unix": int(time.time())}) + "\n")
        say(f"demo: built in {time.perf_counter() - t0:.0f} s (cached for next time)")
    return {**paths, **models}


@contextlib.contextmanager
def demo_client(
    cache_dir: Path | None = None, *, quota: int = DEMO_QUOTA, quiet: bool = False, **overrides: Any
) -> Iterator[Any]:
    """A ready `EdgeClient` on the demo bundles, talking to a loopback cloud server started for it: two cloud
    models (`CLOUD_COSTS`, each a tiny SD3 pipeline with its own batcher), the demo device's quota in units."""
    from routet2i.client import EdgeClient
    from routet2i.cloud_server.servicer import BackgroundServer
    from routet2i.cloud_server.store import open_store

    built = build_demo(cache_dir, quiet=quiet)
    with tempfile.TemporaryDirectory(prefix="routet2i-demo-") as work:
        store = open_store(f"sqlite:///{Path(work) / 'quota.db'}")
        token = store.add_device(DEMO_DEVICE, quota, "day")
        with _hush(Path(work) / "server.log"):  # diffusers' loading bars and notices of the tiny SD3
            pipelines = {name: str(built["cloud_pipeline"]) for name in CLOUD_COSTS}  # loaded once per model
            server = BackgroundServer(store, pipelines, costs=CLOUD_COSTS)
        try:
            options = {k: v for k, v in overrides.items() if v is not None}
            if "budget" not in options and "target_cloud_rate" not in options:
                options["budget"] = DEMO_BUDGET
            options.setdefault("state_file", "")  # fresh pacing state every run
            options.setdefault("decision_log", str(Path(work) / "decisions.jsonl"))
            client = EdgeClient(
                router=built["router"], edge=built["edge"], cloud=server.address, token=token, **options
            )
            try:
                yield client
            finally:
                client.close()
        finally:
            server.stop()
            store.close()


def _read_prompts(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise UsageError(f"--prompts {path}: file not found") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"--prompts {path}: no prompts in the file")
    return prompts


def run_table(prompts: Sequence[str], out_dir: Path | None, steps: int, cache_dir: Path | None) -> list[Any]:
    """Route every prompt and print the table prompt | PRS^ | budget | model | units | route | reason |
    seconds (PRS^: the edge's predicted superiority over the first cloud model, SDXL base; budget: the units
    per prompt targeted after quota-aware pacing; units: the chosen model's cost in quota units, 0 on the edge;
    the summary's quota line is what the server charged)."""
    from routet2i.cli import save_png_atomic  # the training side may use the device's CLI helpers

    results = []
    with demo_client(cache_dir) as client:
        w = min(max(len(p) for p in prompts), 60)
        m = max(len(n) for n in [EDGE_MODEL, *CLOUD_COSTS])
        head = (
            f"{'prompt':<{w}}  {'PRS^':>7}  {'budget':>6}  {'model':<{m}}  {'units':>5}  {'route':<5}  "
            f"{'reason':<17}  {'seconds':>7}"
        )
        print(head)
        print("-" * len(head))
        for i, prompt in enumerate(prompts):
            r = client.generate(prompt, seed=i, num_inference_steps=steps)
            results.append(r)
            shown = prompt if len(prompt) <= w else prompt[: w - 3] + "..."
            prs = "n/a" if r.prs is None else f"{r.prs:.4f}"
            paced = "n/a" if r.paced_rate is None else f"{r.paced_rate:.3f}"
            model = r.model if r.route == "cloud" else EDGE_MODEL  # the router's name for the edge model
            print(
                f"{shown:<{w}}  {prs:>7}  {paced:>6}  {model:<{m}}  {r.cost or 0:>5g}  {r.route:<5}  "
                f"{r.reason:<17}  {r.timings['total']:>7.2f}"
            )
            if out_dir is not None:
                save_png_atomic(r.image, out_dir / f"{i:02d}-{r.route}-{model}.png")
        print("-" * len(head))
        print(_summary(results, results[-1].target_rate if results else None))
    print(NOISE_NOTE)
    if out_dir is not None:
        print(f"images in {out_dir}/")
    return results


def _summary(results: Sequence[Any], budget: float | None) -> str:
    """'3 on the edge (SDXL_2_1), 3 SDXL_Base, 2 DALLE_3: 9 units, 1.12 per prompt (budget 1.0); ...'"""
    n = len(results)
    counts = {name: sum(r.route == "cloud" and r.model == name for r in results) for name in CLOUD_COSTS}
    units = sum(r.cost or 0 for r in results)
    q = results[-1].quota if results else None
    return (
        f"{sum(r.route == 'edge' for r in results)} on the edge ({EDGE_MODEL}), "
        + ", ".join(f"{k} {name}" for name, k in counts.items())
        + f": {units:g} cloud units, {units / max(n, 1):.2f} per prompt (budget {budget}); "
        + (f"cloud quota {q['remaining']}/{q['limit']} units left" if q else "quota unknown")
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`routet2i dev demo`: route a list of prompts through the demo and print the table."""
    p.add_argument("--prompts", type=Path, required=True, help="text file, one prompt per line")
    p.add_argument("--out", type=Path, help="folder for the PNGs")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    p.add_argument("--cache-dir", type=Path, help=f"demo cache (default {default_cache_dir()})")


def run(args: argparse.Namespace) -> int:
    global VERBOSE
    VERBOSE = args.verbose
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be an integer >= 1")
    run_table(_read_prompts(args.prompts), args.out, args.steps, args.cache_dir)
    return 0


def edge_generate(argv: Sequence[str]) -> int:
    """``edge-generate --demo ARGS`` (run by the device CLI in a subprocess): the same command on a demo
    client (tiny bundles, loopback cloud)."""
    from routet2i import cli

    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    cli.setup_logging(args.verbose)
    global VERBOSE
    VERBOSE = args.verbose

    def with_demo_client(run_with: Any) -> Any:
        with demo_client(target_cloud_rate=args.target_rate, budget=args.budget) as client:
            return run_with(client)

    rc = cli.main_with(args, client_factory=with_demo_client)
    if rc == 0 and not args.json:
        print(NOISE_NOTE)
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["edge-generate"]:
        return edge_generate(argv[1:])
    from routet2i.training.cli import main as routet2i_main

    return routet2i_main(["dev", "demo", *argv])


if __name__ == "__main__":
    sys.exit(main())
