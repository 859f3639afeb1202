"""`edge-generate`: generate one image on the device, routed between edge and cloud.

A thin shell over `routet2i.EdgeClient`. Exit codes: 0 ok, 2 bad usage or bad files, 1 any other failure.
``--json`` prints the result fields (not the image) and ``"output"`` as one JSON object on stdout; the
progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError
from routet2i.paths import atomic_path, check_output_path

logger = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-generate", description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="the text prompt")
    p.add_argument(
        "-o",
        "--output",
        default="out.png",
        help="where to write the image: .png (with seed, route, model, PRS^, alpha and the prompt as text "
        "metadata; save_prompt = false leaves the prompt out), .jpg/.jpeg or .webp (default: out.png)",
    )
    p.add_argument("--config", help="routet2i.toml with bundles, cloud endpoint and policy")
    p.add_argument(
        "--demo",
        action="store_true",
        help="tiny random-weight models, bundles and router built once (cached) and a loopback cloud server",
    )
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--seed", type=int, help="random seed (default: random, reported)")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--width", type=int, help="image width (with --height)")
    p.add_argument("--height", type=int, help="image height (with --width)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument(
        "--force",
        choices=["edge", "cloud"],
        help="skip the router's decision (--force cloud fails, exit 1, when the cloud cannot deliver, "
        "unless --allow-fallback)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="a wanted cloud route that cannot be served fails (exit 1) instead of generating on the edge",
    )
    p.add_argument(
        "--allow-fallback",
        action="store_true",
        help="generate on the edge when the cloud fails, even with --force cloud or strict = true",
    )
    p.add_argument(
        "--scheduler",
        help="edge scheduler: dpm++, ddim, euler, pndm (default: the config's, else the bundle's)",
    )
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--local-only", action="store_true", help="keep this prompt on the device")
    p.add_argument("--target-rate", type=float, help="target share of cloud generations in [0, 1]")
    p.add_argument(
        "--budget",
        type=float,
        help="average cloud cost units per prompt (a router with several cloud models; README, SDK)",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        help="generate with this model of the router bundle (an edge or cloud model name; no router)",
    )
    p.add_argument("--deadline", type=float, help="cloud time budget in seconds (retries included)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    return p


def setup_logging(verbose: int) -> None:
    env = os.environ.get("ROUTET2I_LOG_LEVEL", "").upper()
    level = env or ("DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else "WARNING")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


class _Progress:
    """A tqdm bar fed by `ProgressEvent`s; a new bar when the route changes (cloud, then edge fallback)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self.route = None

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None or event.route != self.route:
            self.close()
            self.route = event.route
            self.bar = tqdm(
                total=event.total_steps, desc=event.route, unit="step", file=sys.stderr, leave=False
            )
        self.bar.total = event.total_steps
        self.bar.n = event.step
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def save_png_atomic(image: Any, path: Path) -> None:
    """Write a bare PNG (no metadata) atomically (`GenerateResult.save` writes one with its metadata)."""
    with atomic_path(path) as tmp:  # mode: as a plain open() gives (routet2i.paths)
        image.save(tmp, format="PNG")


def describe(result: Any) -> str:
    """One human line about a decision."""
    prs = "n/a" if result.prs is None else f"{result.prs:.4f}"
    alpha = "n/a" if result.alpha is None else f"{result.alpha:.4f}"
    why = {
        "router": f"PRS^={prs} {'<' if result.route == 'cloud' else '>='} alpha={alpha}",
        "forced": "forced",
        "local_only": "local-only prompt",
        "quota_exhausted": "cloud quota exhausted, generated on the edge",
        "cloud_unavailable": "cloud unavailable, generated on the edge",
        "cloud_error": "cloud error, generated on the edge",
    }.get(result.reason, result.reason)
    if getattr(result, "cost", None) is not None:  # a router with several cloud models
        if result.reason == "router":
            why = f"router chose {result.model} ({result.cost:g} units)"
    elif result.reason != "router":
        why += f" (PRS^={prs}, alpha={alpha})"
    cause = getattr(result, "cloud_error", None)
    if cause and result.route == "edge":
        why += f"; cloud: {cause}"
    quota = ""
    if result.quota:
        quota = f", cloud quota {result.quota['remaining']}/{result.quota['limit']} left"
    rate = ""
    if result.paced_rate is not None:
        target = "n/a" if result.target_rate is None else f"{result.target_rate:.3f}"
        rate = f"; paced rate {result.paced_rate:.3f} (target {target})"
    return f"{result.route} [{result.reason}]: {why}{rate}; {result.timings['total']:.2f} s{quota}"


def _generate(args: argparse.Namespace, client: Any, progress: _Progress) -> Any:
    return client.generate(
        args.prompt,
        negative_prompt=args.negative,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        width=args.width,
        height=args.height,
        seed=args.seed,
        force=args.model or args.force,
        local_only=args.local_only,
        progress=progress,
        deadline_s=args.deadline,
        strict=_strict(args),
    )


def _strict(args: argparse.Namespace) -> bool | None:
    """--allow-fallback: False; --strict or --force cloud: True; else None (the config's ``strict``)."""
    if args.allow_fallback:
        return False
    if args.strict or args.force == "cloud":
        return True
    return None


def run(args: argparse.Namespace, client_factory: Any = None) -> int:
    if (args.width is None) != (args.height is None):
        raise UsageError("--width and --height go together: give both or neither")
    if args.strict and args.allow_fallback:
        raise UsageError("--strict and --allow-fallback contradict each other: give one")
    if args.model and args.force:
        raise UsageError("--model and --force both choose where to generate: give one")
    if args.demo and args.config:
        raise UsageError("--demo uses its own tiny models and loopback cloud; drop --config (or --demo)")
    output = Path(args.output)
    from routet2i.client import image_format

    try:
        image_format(output)
    except UsageError as exc:
        raise UsageError(f"-o {exc}") from None
    check_output_path(output, "-o")
    progress = _Progress(enabled=not args.no_progress)
    overrides = {"target_cloud_rate": args.target_rate, "scheduler": args.scheduler}
    if args.budget is not None:
        overrides["budget"] = args.budget
    try:
        if client_factory is not None:
            result = client_factory(lambda client: _generate(args, client, progress))
        elif args.demo:
            raise UsageError("--demo runs through `edge-generate` (a subprocess on the workstation side)")
        else:
            if (
                args.config is None
                and not os.environ.get("ROUTET2I_ROUTER")
                and not os.environ.get("ROUTET2I_EDGE")
            ):
                raise UsageError(
                    "no configuration: pass --config routet2i.toml (see README, section SDK), "
                    "set ROUTET2I_ROUTER / ROUTET2I_EDGE, or try `edge-generate --demo PROMPT`"
                )
            from routet2i.client import EdgeClient

            with EdgeClient.from_config(args.config, **overrides) as client:
                result = _generate(args, client, progress)
    finally:
        progress.close()
    result.save(output)  # atomic; the format by the extension, with the result's metadata
    if args.json:
        print(json.dumps({**result.to_dict(), "output": str(output)}, allow_nan=False))
    else:
        print(describe(result))
        print(f"wrote {output} ({result.width}x{result.height}, seed {result.seed})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0), message already printed
        return int(exc.code or 0)
    setup_logging(args.verbose)
    if args.demo and not args.config:
        return launch_demo(list(sys.argv[1:] if argv is None else argv))
    return main_with(args)


def launch_demo(argv: list[str]) -> int:
    """``--demo``: the demo trains and exports with torch, which the device package never imports; run it
    in a subprocess (``python -m routet2i.training.demo edge-generate ARGS``), or say which install it needs."""
    import importlib.util
    import subprocess

    missing = []
    for name in ("routet2i.training", "torch"):
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        print(
            f"edge-generate: error: --demo trains and exports tiny models with torch ({', '.join(missing)} "
            "not installed): install the workstation extras, pip install 'routet2i[all]' (or from a checkout: "
            "pip install -e '.[all]'); on a device use --config routet2i.toml",
            file=sys.stderr,
        )
        return 2
    cmd = [sys.executable, "-m", "routet2i.training.demo", "edge-generate", *argv]
    try:
        return subprocess.run(cmd, check=False).returncode
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main_with(args: argparse.Namespace, client_factory: Any = None) -> int:
    """Run parsed arguments; errors become one line and an exit code. ``client_factory(fn)`` calls
    ``fn(client)`` with a ready client (the demo's); None: `EdgeClient.from_config`."""
    try:
        return run(args, client_factory)
    except (UsageError, FileNotFoundError) as exc:
        print(f"edge-generate: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # BundleError and other bad-input errors from the libraries
        print(f"edge-generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ConnectionError as exc:  # a CloudError under --force cloud / strict: no edge fallback wanted
        logger.debug("failure", exc_info=True)
        hint = "" if args.allow_fallback else "; --allow-fallback generates on the edge instead"
        print(f"edge-generate: failed: {exc}{hint}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, exit 1, traceback only with -v
        logger.debug("failure", exc_info=True)
        print(f"edge-generate: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
