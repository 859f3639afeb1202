"""`routet2i-cloud`: serve SD3 over gRPC and administer devices and quotas.

Placeholder of the foundation: the subcommands of CONTRACTS.md section 2 exist and answer
"not implemented yet" (exit 2) until the cloud endpoint lands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="routet2i-cloud", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("serve", help="serve an SD3 pipeline over gRPC").add_argument("rest", nargs=argparse.REMAINDER)
    device = sub.add_parser("device", help="devices and quotas")
    dsub = device.add_subparsers(dest="device_command", metavar="SUBCOMMAND", parser_class=_Parser)
    dsub.required = True
    for name in ("add", "show", "list", "set-quota"):
        dsub.add_parser(name, help=f"device {name}").add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command + (f" {args.device_command}" if args.command == "device" else "")
    print(f"routet2i-cloud {name}: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
