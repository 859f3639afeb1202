"""`edge-generate`: usage errors exit 2 with one line, failures exit 1 (no models needed here; the
end-to-end --json run is in test_sdk_e2e.py)."""

from __future__ import annotations

import socket

import pytest
from routet2i.cli import main

CLEAN_ENV = ("ROUTET2I_ROUTER", "ROUTET2I_EDGE", "ROUTET2I_CLOUD", "ROUTET2I_TOKEN")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for var in CLEAN_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["a fox"], "--config"),
        (["a fox", "--width", "64"], "--width and --height"),
        (["a fox", "--config", "/nonexistent/routet2i.toml"], "does not exist"),
        (["a fox", "--demo", "--config", "x.toml"], "--demo"),
        (["a fox", "-o", "out.gif", "--config", "x.toml"], "allowed: .png, .jpg, .jpeg, .webp"),
        (["a fox", "--force", "gpu"], "invalid choice"),
        (["a fox", "--steps", "many"], "invalid int"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_config_value_exit_2(tmp_path, capsys):
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text('[policy]\ntarget_cloud_rate = 3\n[cloud]\ntoken = "x"\n')
    assert main(["a fox", "--config", str(cfg)]) == 2
    assert "never read from a file" in capsys.readouterr().err


def test_missing_bundle_exit_2(tmp_path, capsys):
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text('edge = "no-such-bundle"\n')
    assert main(["a fox", "--config", str(cfg), "--force", "edge"]) == 2
    assert "no-such-bundle" in capsys.readouterr().err


def test_cloud_down_without_edge_fallback_exit_1(tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "routet2i.toml"
    cfg.write_text(f'[cloud]\nendpoint = "127.0.0.1:{port}"\ndeadline_s = 1\nretries = 1\n')
    out = tmp_path / "x.png"
    assert main(["a fox", "--config", str(cfg), "--force", "cloud", "-o", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "failed" in err and "Traceback" not in err
    assert not out.exists()


def test_text_output_shows_the_paced_rate_next_to_alpha():
    from types import SimpleNamespace

    from routet2i.cli import describe

    r = SimpleNamespace(route="edge", reason="router", prs=0.61, alpha=0.42, paced_rate=0.2, target_rate=0.3,
                        timings={"total": 1.5}, quota={"remaining": 3, "limit": 10})  # fmt: skip
    line = describe(r)
    assert "PRS^=0.6100 >= alpha=0.4200; paced rate 0.200 (target 0.300)" in line
    assert "cloud quota 3/10 left" in line
    assert "paced" not in describe(SimpleNamespace(**{**vars(r), "paced_rate": None}))
