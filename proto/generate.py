"""Regenerate the checked-in gRPC stubs from proto/routet2i/cloud/v1/cloud.proto.

Usage: python proto/generate.py [--check]. The stubs land in sdk/cloud/v1/ (import name
routet2i.cloud.v1). ``--check`` exits 1 when the checked-in stubs differ from a fresh generation
(a test runs it), so the proto and the stubs never drift.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("routet2i/cloud/v1/cloud.proto")
DEST = ROOT / "sdk" / "cloud" / "v1"
GENERATED = ("cloud_pb2.py", "cloud_pb2.pyi", "cloud_pb2_grpc.py")


def generate(out: Path) -> None:
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / PROTO.parent
        if args.check:
            stale = [
                n for n in GENERATED if not (DEST / n).exists() or not filecmp.cmp(fresh / n, DEST / n, False)
            ]
            if stale:
                print(
                    f"stale gRPC stubs: {', '.join(stale)}; run `python proto/generate.py`", file=sys.stderr
                )
                return 1
            return 0
        for name in GENERATED:
            shutil.copyfile(fresh / name, DEST / name)
    print(f"wrote {', '.join(GENERATED)} to {DEST.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
