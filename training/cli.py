"""`routet2i`: the workstation CLI (data, labels, train, eval, export, dev).

A thin shell over library calls. Each subcommand lives in its own module that exposes
``add_arguments(parser)`` and ``run(args) -> int``; those modules keep heavy imports (torch, diffusers)
inside functions so that ``routet2i --help`` stays fast. A registered module that does not exist yet
makes its subcommand answer "not implemented yet" with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from routet2i._errors import UsageError

# (group, name) -> (module, one-line help). group None: a top-level command.
COMMANDS: dict[tuple[str | None, str], tuple[str, str]] = {
    ("dev", "tiny-models"): (
        "routet2i.training.tiny_models",
        "build tiny random-weight SD2.1 / SD3 / CLIP folders with the real architectures",
    ),
    ("dev", "tiny-demo"): (
        "routet2i.training.tiny_demo",
        "one tiny SD2.1 and one tiny SD3 generation to PNGs (random weights: the images are noise)",
    ),
    ("dev", "demo"): (
        "routet2i.training.demo",
        "the demo: route a prompt list through tiny bundles and a loopback cloud, print the table",
    ),
    ("dev", "keygen"): (
        "routet2i.signing",
        "write an Ed25519 key pair for signing bundles (export --sign-key / the device's trusted_keys)",
    ),
    ("data", "build"): (
        "routet2i.training.data_build",
        "generate edge and cloud images for prompts and score them into a quality table",
    ),
    ("data", "stats"): (
        "routet2i.training.data_stats",
        "cloud win rate and mean gap by noun count (the paper's Fig. 3)",
    ),
    (None, "labels"): ("routet2i.training.labels", "compute PRS labels for an edge/cloud model pair"),
    (None, "train"): (
        "routet2i.training.train",
        "train a router (default multitask; RouteT2I or a baseline with --method)",
    ),
    (None, "eval"): ("routet2i.training.evaluate", "K-fold x seeds evaluation of routers: JSON + plot"),
    ("export", "router"): ("routet2i.export.router", "export a trained router to an ONNX router bundle"),
    ("export", "edge"): ("routet2i.export.edge", "export an SD2.1 pipeline to an ONNX edge bundle"),
}

GROUP_HELP = {
    "dev": "developer tools",
    "data": "quality data: build tables from pipelines, statistics",
    "export": "export router and edge pipeline to ONNX bundles",
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors and exit code 2 (CONTRACTS.md section 2).

    An unknown option is named even when required options are missing too (argparse alone would only
    complain about the missing ones).
    """

    _argv: list[str] = []

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("the following arguments are required"):
            unknown = [
                a
                for a in self._argv
                if a.startswith("-")
                and a.split("=", 1)[0] not in self._option_string_actions
                and not _is_number(a)
            ]
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module.startswith(exc.name):
            return None  # the subcommand's module is not written yet
        raise


def _not_implemented(args: argparse.Namespace) -> int:
    print(f"routet2i {args._command}: not implemented yet", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="routet2i", description=__doc__.splitlines()[0])
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)"
    )
    top = parser.add_subparsers(dest="_group", metavar="COMMAND", parser_class=_Parser)
    top.required = True
    groups: dict[str, argparse._SubParsersAction] = {}
    for (group, name), (module_name, help_text) in COMMANDS.items():
        if group is None:
            target, full = top, name
        else:
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP[group])
                groups[group] = gp.add_subparsers(dest="_sub", metavar="SUBCOMMAND", parser_class=_Parser)
                groups[group].required = True
            target, full = groups[group], f"{group} {name}"
        sub = target.add_parser(name, help=help_text, description=help_text)
        module = _load(module_name)
        if module is None or not hasattr(module, "add_arguments"):
            sub.set_defaults(_handler=_not_implemented, _command=full)
        else:
            module.add_arguments(sub)
            sub.set_defaults(_handler=module.run, _command=full)
    return parser


def setup_logging(verbose: int) -> None:
    env = os.environ.get("ROUTET2I_LOG_LEVEL", "").upper()
    level = env or ("DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else "WARNING")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args._handler is not _not_implemented:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    setup_logging(args.verbose)
    try:
        return int(args._handler(args) or 0)
    except UsageError as exc:
        print(f"routet2i {args._command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
