"""Output paths that cannot be written are one-line errors with exit code 2, found before any work starts
(CONTRACTS.md section 2), in every command that writes a file or a folder; and what is written is an
ordinary file. Found by the acceptance audit: each case below was a traceback (exit 1) before."""

from __future__ import annotations

import os
import stat

import pytest
from routet2i._errors import UsageError
from routet2i.paths import check_output_path


@pytest.fixture
def blocker(tmp_path):
    """A file where a folder is expected."""
    f = tmp_path / "blocker"
    f.write_text("a file, not a folder")
    return f


def test_check_output_path(tmp_path, blocker):
    assert (
        check_output_path(tmp_path / "new" / "deeper" / "x.csv", "--out")
        == tmp_path / "new" / "deeper" / "x.csv"
    )
    with pytest.raises(UsageError, match=r"--out .*blocker is a file, not a folder"):
        check_output_path(blocker / "sub" / "x.csv", "--out")
    with pytest.raises(UsageError, match="is a folder; give a file path"):
        check_output_path(tmp_path, "--json")
    with pytest.raises(UsageError, match="exists and is not a folder"):
        check_output_path(blocker, "--out", folder=True)
    assert not (tmp_path / "new").exists()  # creates nothing


def _routet2i(capsys, *argv: str) -> tuple[int, str]:
    from routet2i.training.cli import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def _one_line_exit_2(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _table(tmp_path):
    t = tmp_path / "q.csv"
    rows = ["dataset,prompt_id,prompt,model,metric,value,n"]
    for i in range(3):
        rows += [f"d,p{i},prompt {i},e,m,0.{i + 1},1", f"d,p{i},prompt {i},c,m,0.{i + 4},1"]
    t.write_text("\n".join(rows) + "\n")
    return t


def test_labels_out_under_a_file(capsys, tmp_path, blocker):
    code, err = _routet2i(capsys, "labels", "--table", str(_table(tmp_path)), "--dataset", "d", "--edge-model", "e",
                          "--cloud-model", "c", "--out", str(blocker / "labels.csv"))  # fmt: skip
    _one_line_exit_2(code, err, "--out")


def test_labels_out_is_a_folder(capsys, tmp_path):
    code, err = _routet2i(capsys, "labels", "--table", str(_table(tmp_path)), "--dataset", "d", "--edge-model", "e",
                          "--cloud-model", "c", "--out", str(tmp_path))  # fmt: skip
    _one_line_exit_2(code, err, "is a folder")


def test_data_stats_json_under_a_file(capsys, tmp_path, blocker):
    code, err = _routet2i(capsys, "data", "stats", "--table", str(_table(tmp_path)), "--dataset", "d",
                          "--edge-model", "e", "--cloud-model", "c", "--json", str(blocker / "s.json"))  # fmt: skip
    _one_line_exit_2(code, err, "--json")


def test_data_build_out_under_a_file_before_loading_anything(capsys, tmp_path, blocker):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    code, err = _routet2i(capsys, "data", "build", "--prompts", str(prompts), "--edge-pipeline", "/no/edge",
                          "--cloud-pipeline", "/no/cloud", "--clip", "/no/clip",
                          "--out", str(blocker / "q.csv"))  # fmt: skip
    _one_line_exit_2(code, err, "--out")


def test_tiny_models_out_under_a_file(capsys, blocker):
    code, err = _routet2i(capsys, "dev", "tiny-models", "--out", str(blocker / "tiny"))
    _one_line_exit_2(code, err, "--out")


def test_export_router_out_under_a_file(capsys, tmp_path, blocker):
    router = tmp_path / "router"
    router.mkdir()
    (router / "router.pt").write_bytes(b"")  # never read: the output is checked first
    code, err = _routet2i(capsys, "export", "router", "--router", str(router), "--out", str(blocker / "b"))
    _one_line_exit_2(code, err, "--out")


def test_export_edge_out_under_a_file(capsys, blocker):
    code, err = _routet2i(
        capsys, "export", "edge", "--pipeline", "/no/such/pipeline", "--out", str(blocker / "b")
    )
    _one_line_exit_2(code, err, "--out")


def test_edge_generate_output_under_a_file_before_generating(capsys, blocker):
    from routet2i.cli import main

    code = main(["a red fox", "-o", str(blocker / "fox.png"), "--no-progress"])
    _one_line_exit_2(code, capsys.readouterr().err, "-o")


def test_edge_generate_png_has_ordinary_permissions(tmp_path):
    from PIL import Image
    from routet2i.cli import save_png_atomic

    out = tmp_path / "fox.png"
    save_png_atomic(Image.new("RGB", (8, 8)), out)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_generate_refuses_a_deadline_that_is_not_positive():
    from routet2i.client import EdgeClient

    with EdgeClient(state_file="", decision_log="") as client:
        for bad in (-1, 0, float("nan"), "10"):
            with pytest.raises(UsageError, match="deadline_s="):
                client.generate("a red fox", deadline_s=bad)
