"""`routet2i-cloud` admin commands and argument errors (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from _cloud_helpers import *  # noqa: F403 - the store fixtures
from routet2i.cloud_server import open_store
from routet2i.cloud_server.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_device_add_show_list_set_quota(capsys, store_url):
    code, out, err = _run(capsys, "device", "add", "--db", store_url, "--device-id", "cam-1", "--quota", "5",
                          "--period", "day", "--json")  # fmt: skip
    assert code == 0, err
    added = json.loads(out)
    assert added["device_id"] == "cam-1"
    with open_store(store_url) as store:
        assert store.authenticate(added["token"]).device_id == "cam-1"
    code, out, _ = _run(capsys, "device", "add", "--db", store_url, "--device-id", "cam-2", "--quota", "1",
                        "--period", "total")  # fmt: skip
    token2 = out.strip().splitlines()[-1]
    assert code == 0 and token2.startswith("rt2i_")
    code, out, _ = _run(capsys, "device", "show", "--db", store_url, "--device-id", "cam-1", "--json")
    assert json.loads(out) == {"device_id": "cam-1", "limit": 5, "used": 0, "reserved": 0, "remaining": 5,
                               "period": "day", "period_end_unix": json.loads(out)["period_end_unix"]}  # fmt: skip
    code, out, _ = _run(capsys, "device", "set-quota", "--db", store_url, "--device-id", "cam-1", "--quota", "9",
                        "--period", "month")  # fmt: skip
    assert code == 0 and out.strip() == "cam-1: 0 used, 0 in progress, 9 remaining of 9 per month"
    code, out, _ = _run(capsys, "device", "list", "--db", store_url, "--json")
    assert [(d["device_id"], d["limit"], d["period"]) for d in json.loads(out)] == [("cam-1", 9, "month"),
                                                                                  ("cam-2", 1, "total")]  # fmt: skip


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["device", "add", "--device-id", "x", "--quota", "1", "--period", "week"], "invalid choice"),
        (["device", "add", "--device-id", "x", "--quota", "-3", "--period", "day"], "must be >= 0"),
        (["device", "add", "--device-id", "bad id", "--quota", "1", "--period", "day"], "device_id='bad id'"),
        (["device", "add", "--device-id", "dup", "--quota", "1", "--period", "day"], "already exists"),
        (["device", "show", "--device-id", "ghost"], "no device 'ghost'"),
        (["device", "set-quota", "--device-id", "dup"], "give --quota N and/or --period"),
        (["serve", "--pipeline", "noop", "--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["serve", "--pipeline", "noop", "--batch-window-ms", "-5"], "batch_window_s=-0.005"),
        (["serve", "--pipeline", "/no/such/sd3", "--listen", "127.0.0.1:0"], "no such folder"),
        (
            [
                "serve",
                "--pipeline",
                "noop",
                "--listen",
                "127.0.0.1:0",
                "--tls-cert",
                "/no/c.pem",
                "--tls-key",
                "/no/k",
            ],
            "--tls-cert /no/c.pem: no such file",
        ),
    ],
)
def test_bad_arguments_are_one_line_exit_2(capsys, sqlite_url, argv, needle):
    with open_store(sqlite_url) as store:
        store.add_device("dup", quota=1, period="day")
    code, out, err = _run(capsys, *argv, "--db", sqlite_url)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_db_urls_are_one_line_exit_2(capsys, tmp_path):
    for url, needle in [("mysql://x", "is not supported"), (f"sqlite:///{tmp_path}/no/dir/q.db", "does not exist"),
                        ("postgresql://nobody@127.0.0.1:1/x", "127.0.0.1")]:  # fmt: skip
        code, out, err = _run(capsys, "device", "list", "--db", url)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_console_script_prints_token_once(tmp_path):
    exe = shutil.which("routet2i-cloud", path=str(__import__("pathlib").Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the routet2i-cloud console script is not installed in this environment")
    db = f"sqlite:///{tmp_path / 'q.db'}"
    r = subprocess.run([exe, "device", "add", "--db", db, "--device-id", "d", "--quota", "2", "--period", "total",
                        "--json"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["token"]
    shown = subprocess.run([exe, "device", "show", "--db", db, "--device-id", "d"], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert shown.returncode == 0 and token not in shown.stdout + shown.stderr
    assert shown.stdout.strip() == "d: 0 used, 0 in progress, 2 remaining of 2 in total"


# --- bind and file errors found by the acceptance audit


def _serve_once(store_url: str, listen: str, **kwargs) -> int:
    """create_server then stop at once; returns the bound port."""
    import asyncio

    from routet2i.cloud_server.servicer import create_server

    async def go() -> int:
        server, port = await create_server(store_url, "noop", listen, **kwargs)
        await server.stop(0)
        return port

    return asyncio.run(go())


def test_listen_port_out_of_range_is_refused(capsys, sqlite_url):
    # gRPC alone wraps 99999 around (to 34463) and serves there without a word
    with pytest.raises(ValueError, match=r"PORT in 0\.\.65535"):
        _serve_once(sqlite_url, "127.0.0.1:99999")
    code, _, err = _run(
        capsys, "serve", "--pipeline", "noop", "--listen", "127.0.0.1:99999", "--db", sqlite_url
    )
    assert code == 2 and "--listen '127.0.0.1:99999'" in err and len(err.strip().splitlines()) == 1


def test_taken_port_is_refused_not_shared(sqlite_url):
    # gRPC sets SO_REUSEPORT by default: a second server would bind the same port and share its traffic
    from routet2i.cloud_server import BackgroundServer

    with BackgroundServer(sqlite_url, "noop") as srv:
        with pytest.raises(OSError, match="could not bind"):
            _serve_once(sqlite_url, f"127.0.0.1:{srv.port}")


def test_taken_metrics_port_names_the_option(capsys, sqlite_url):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, _, err = _run(capsys, "serve", "--pipeline", "noop", "--listen", "127.0.0.1:0",
                            "--metrics-port", str(port), "--db", sqlite_url, "--create-db")  # fmt: skip
    assert code == 2 and f"--metrics-port {port}: could not bind" in err and "Traceback" not in err


def test_tls_files_that_are_not_pem_are_named(capsys, sqlite_url, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"\x00\x01not a certificate")
    code, _, err = _run(capsys, "serve", "--pipeline", "noop", "--listen", "127.0.0.1:0", "--tls-cert", str(junk),
                        "--tls-key", str(junk), "--db", sqlite_url, "--create-db")  # fmt: skip
    assert code == 2 and f"--tls-cert {junk}: not a PEM file" in err and len(err.strip().splitlines()) == 1


def test_sqlite_db_that_is_not_a_database(capsys, tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"dataset,prompt\n" * 100)
    code, _, err = _run(capsys, "device", "list", "--db", f"sqlite:///{junk}")
    assert code == 2 and "is not a usable SQLite store" in err and len(err.strip().splitlines()) == 1
