"""`routet2i-cloud` admin commands and argument errors (one line, exit 2, no traceback)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from _cloud_helpers import CLOUD_CLI, ServeProcess
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


# --- issue 11 item 3: database passwords are never printed or logged

SECRET = "S3CRET-pw"


def _with_password(url: str) -> str:
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{SECRET}@{host}"


@pytest.mark.postgres
def test_database_passwords_are_never_printed(capsys, pg_url):
    url = _with_password(pg_url)  # trust auth: any password is accepted
    bad = ["postgresql://postgres:S3CRET-pw@[bad/x", "postgresql://postgres:S3CRET-pw@127.0.0.1:1/x",
           "postgresql://postgres:S3CRET-pw@127.0.0.1:5432/test?bogus=1"]  # fmt: skip
    runs = [
        ("device", "list", "--db", url),  # no store in this schema yet
        ("device", "add", "--db", url, "--device-id", "cam", "--quota", "1", "--period", "day"),
        ("device", "show", "--db", url, "--device-id", "nope"),
        ("device", "set-quota", "--db", url, "--device-id", "nope", "--quota", "2"),
        *[("device", "show", "--db", b, "--device-id", "x") for b in bad],
    ]
    for argv in runs:
        code, out, err = _run(capsys, *argv)
        assert SECRET not in out + err, (argv, out, err)
        if argv[1] != "add":
            assert code == 2 and len(err.strip().splitlines()) == 1 and "***" in err, (argv, err)


@pytest.mark.postgres
def test_serve_logs_never_show_the_database_password(pg_url):
    url = _with_password(pg_url)
    with open_store(url) as store:
        assert SECRET not in store.url and "***" in store.url
    server = ServeProcess(url, "--pipeline", "noop", env={"ROUTET2I_LOG_LEVEL": "DEBUG"})
    assert server.terminate() == 0
    log = server.proc.stderr.read()
    assert "store=postgresql://postgres:***@" in log and SECRET not in log


# --- issue 11 item 6: broken, missing and read-only stores


def _serve_cli(db: str, *extra: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`serve` in a subprocess; a server that (wrongly) starts serving is stopped and reported."""
    cmd = [*CLOUD_CLI, "serve", "--pipeline", "noop", "--listen", "127.0.0.1:0", "--db", db, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"serve did not refuse the store; it served: {out[-300:]} {err[-300:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _one_line_exit_2(r, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_serve_refuses_a_page_corrupted_sqlite_store(tmp_path):
    path = tmp_path / "q.db"
    with open_store(f"sqlite:///{path}") as store:
        for i in range(50):
            store.add_device(f"dev-{i}", quota=3, period="total")
    assert not (tmp_path / "q.db-wal").exists() or (tmp_path / "q.db-wal").stat().st_size == 0
    with open(path, "r+b") as f:  # a page in the middle, not the header: the file still opens
        f.seek(2 * 4096 + 100)
        f.write(b"\xff" * 500)
    r = _serve_cli(f"sqlite:///{path}")
    _one_line_exit_2(r, f"--db sqlite:///{path}", "damaged")


@contextlib.contextmanager
def _read_only(path):
    """Make `path` unwritable even for root (chattr +i), or by mode for an ordinary user; skip if neither."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file read-only for root here (chattr +i unsupported)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], capture_output=True)


def test_a_read_only_store_is_refused_by_serve_and_device_add(capsys, tmp_path):
    path = tmp_path / "q.db"
    url = f"sqlite:///{path}"
    with open_store(url) as store:
        store.add_device("cam", quota=1, period="total")
    with _read_only(path):
        _one_line_exit_2(_serve_cli(url), f"--db {url}", "write probe")
        code, out, err = _run(capsys, "device", "add", "--db", url, "--device-id", "x", "--quota", "1",
                              "--period", "day")  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1 and "readonly" in err and url in err, err
        code, out, err = _run(capsys, "device", "list", "--db", url)  # reading still works
        assert code == 0 and out.startswith("cam:"), err


def test_only_device_add_or_serve_create_db_creates_a_store(capsys, tmp_path):
    path = tmp_path / "typo.db"
    url = f"sqlite:///{path}"
    for argv in (("device", "list"), ("device", "show", "--device-id", "x"),
                 ("device", "set-quota", "--device-id", "x", "--quota", "1")):  # fmt: skip
        code, out, err = _run(capsys, *argv, "--db", url)
        assert code == 2 and "no quota store" in err and len(err.strip().splitlines()) == 1, err
        assert not path.exists()
    _one_line_exit_2(_serve_cli(url), "no quota store", "--create-db")
    assert not path.exists()
    server = ServeProcess(url, "--pipeline", "noop", "--create-db")
    assert server.terminate() == 0 and path.exists()
    path.unlink()
    code, out, err = _run(
        capsys, "device", "add", "--db", url, "--device-id", "x", "--quota", "1", "--period", "day"
    )
    assert code == 0 and path.exists()
    empty = tmp_path / "empty.db"
    empty.touch()  # an existing file that holds no store is not turned into one either
    code, out, err = _run(capsys, "device", "list", "--db", f"sqlite:///{empty}")
    assert code == 2 and "holds no quota store" in err


@pytest.mark.postgres
def test_postgres_store_tables_are_created_only_by_device_add(capsys, pg_url):
    code, out, err = _run(capsys, "device", "list", "--db", pg_url)  # a fresh, empty schema
    assert code == 2 and "no quota store tables" in err
    code, out, err = _run(capsys, "device", "add", "--db", pg_url, "--device-id", "x", "--quota", "1",
                          "--period", "day")  # fmt: skip
    assert code == 0, err
    code, out, err = _run(capsys, "device", "list", "--db", pg_url)
    assert code == 0 and out.startswith("x:")


def test_quota_beyond_int64_is_one_line(capsys, sqlite_url):
    big = str(2**63)
    code, out, err = _run(capsys, "device", "add", "--db", sqlite_url, "--device-id", "x", "--quota", big,
                          "--period", "day")  # fmt: skip
    assert code == 2 and "2**63-1" in err and len(err.strip().splitlines()) == 1
    code, _, _ = _run(capsys, "device", "add", "--db", sqlite_url, "--device-id", "x", "--quota", str(2**63 - 1),
                      "--period", "day")  # fmt: skip
    assert code == 0
    code, out, err = _run(
        capsys, "device", "set-quota", "--db", sqlite_url, "--device-id", "x", "--quota", big
    )
    assert code == 2 and "2**63-1" in err
    with open_store(sqlite_url) as store:
        with pytest.raises(ValueError, match="2\\*\\*63-1"):
            store.add_device("y", quota=2**63, period="day")
        assert store.get_device("x").limit == 2**63 - 1


# --- issue 11 item 10 (the serve part): --grace must be a finite number >= 0


@pytest.mark.parametrize("grace", ["nan", "inf", "-1", "-inf", "x"])
def test_serve_grace_must_be_finite_and_not_negative(capsys, tmp_path, grace):
    # a --db in a missing folder: a parser that let --grace through would fail later, on the store
    code, out, err = _run(capsys, "serve", "--pipeline", "noop", "--grace", grace, "--db",
                          f"sqlite:///{tmp_path}/missing/q.db")  # fmt: skip
    assert code == 2 and "--grace" in err and len(err.strip().splitlines()) == 1, err
