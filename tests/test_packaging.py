"""The distribution: one wheel whose import names all live under `routet2i`; stubs match the proto; the
console scripts exist with the subcommands of CONTRACTS.md section 2."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("routet2i-*.whl")
    return whl


def test_wheel_import_names_all_under_routet2i(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"routet2i", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops
    for expected in (
        "routet2i/__init__.py",
        "routet2i/py.typed",
        "routet2i/cloud/v1/cloud_pb2.py",
        "routet2i/cloud/v1/cloud_pb2_grpc.py",
        "routet2i/export/__init__.py",
        "routet2i/cloud_server/__init__.py",
        "routet2i/training/__init__.py",
        "routet2i/training/cli.py",
    ):
        assert expected in names, f"{expected} missing from the wheel"
    # Every source module of the four folders ships, mapped under routet2i.
    folders = {
        "sdk": "routet2i",
        "export": "routet2i/export",
        "cloud_server": "routet2i/cloud_server",
        "training": "routet2i/training",
    }
    for folder, prefix in folders.items():
        for src in (REPO / folder).rglob("*.py"):
            rel = src.relative_to(REPO / folder).as_posix()
            assert f"{prefix}/{rel}" in names, f"{folder}/{rel} is not in the wheel"
    entry_points = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
    for script in ("routet2i =", "routet2i-cloud =", "edge-generate ="):
        assert script in entry_points


def test_wheel_imports_from_its_own_files(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        f"import sys; sys.path.insert(0, {str(target)!r});"
        "import routet2i, routet2i.export, routet2i.cloud_server, routet2i.training;"
        "from routet2i.cloud.v1 import cloud_pb2, cloud_pb2_grpc;"
        "mods = [routet2i, routet2i.export, routet2i.cloud_server, routet2i.training, cloud_pb2];"
        f"bad = [m.__name__ for m in mods if not m.__file__.startswith({str(target)!r})];"
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not (target / "sdk").exists() and not (target / "export").exists()


def test_editable_install_maps_folders() -> None:
    code = (
        "import routet2i, routet2i.export, routet2i.cloud_server, routet2i.training;"
        "print(routet2i.__file__); print(routet2i.export.__file__); print(routet2i.training.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    sdk, export, training = out.stdout.split()
    assert Path(sdk).parent == REPO / "sdk"
    assert Path(export).parent == REPO / "export"
    assert Path(training).parent == REPO / "training"
    for name in ("sdk", "export"):
        spec = subprocess.run(
            [sys.executable, "-c", f"import importlib.util; print(importlib.util.find_spec({name!r}))"],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        )
        assert spec.stdout.strip() == "None", f"a top-level module {name!r} is importable"


def test_grpc_stubs_match_the_proto() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_proto_has_the_contract() -> None:
    from routet2i.cloud.v1 import cloud_pb2

    service = cloud_pb2.DESCRIPTOR.services_by_name["CloudGeneration"]
    assert {m.name for m in service.methods} >= {"Generate", "GenerateStream", "GetQuota"}
    request = cloud_pb2.GenerateRequest(request_id="r", prompt="p", guidance_scale=7.5, seed=3)
    assert request.HasField("guidance_scale") and request.HasField("seed")
    assert not cloud_pb2.GenerateRequest().HasField("seed")
    event = cloud_pb2.GenerateEvent(progress=cloud_pb2.Progress(step=1, total_steps=2))
    assert event.WhichOneof("event") == "progress"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ROUTET2I_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["routet2i", "--help"], ["dev", "data", "labels", "train", "eval", "export"]),
        (["routet2i", "dev", "--help"], ["tiny-models"]),
        (["routet2i", "data", "--help"], ["build"]),
        (["routet2i", "export", "--help"], ["router", "edge"]),
        (["routet2i-cloud", "--help"], ["serve", "device"]),
        (["routet2i-cloud", "device", "--help"], ["add", "show", "list", "set-quota"]),
        (["edge-generate", "--help"], ["--demo", "--json", "--force", "--config", "--seed", "--steps"]),
    ],
)
def test_console_scripts_help(argv: list[str], words: list[str]) -> None:
    out = _run(*argv)
    assert out.returncode == 0, out.stderr
    for word in words:
        assert word in out.stdout, f"{word!r} missing from `{' '.join(argv)}`"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["routet2i", "frobnicate"], "frobnicate"),
        (["routet2i", "labels", "--no-such-option"], "--no-such-option"),
        (["routet2i-cloud", "frobnicate"], "frobnicate"),
        (["edge-generate", "a fox", "--no-such-option"], "--no-such-option"),
    ],
)
def test_unknown_subcommand_or_option_is_one_line_exit_2(argv: list[str], needle: str) -> None:
    out = _run(*argv)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_cli_parsers_import_nothing_heavy() -> None:
    """`routet2i --help` builds every subparser: the subcommand modules keep torch & co. inside functions."""
    code = (
        "import sys; from routet2i.training.cli import build_parser; build_parser();"
        "from routet2i.cloud_server.cli import build_parser as b2; b2();"
        "from routet2i.cli import build_parser as b3; b3();"
        "heavy = ('torch', 'diffusers', 'transformers', 'optimum', 'pandas');"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"building the CLI parsers imported {out.stdout.strip()}"
