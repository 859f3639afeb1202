"""`edge-generate`: generate one image on the device, routed between edge and cloud.

Placeholder of the foundation: the options of CONTRACTS.md section 2 exist; generation answers
"not implemented yet" (exit 2) until the SDK lands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="edge-generate", description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", default="out.png", help="where to write the PNG")
    p.add_argument("--config", help="routet2i.toml with bundles, cloud endpoint and policy")
    p.add_argument("--demo", action="store_true", help="use tiny demo models and a loopback cloud")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--force", choices=["edge", "cloud"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("edge-generate: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
