"""One rule each, used everywhere (issue 16 item 10): alpha from a cloud rate, atomic writes, the seed bound,
and library code that logs instead of printing."""

from __future__ import annotations

import pytest
from routet2i._errors import UsageError

TABLE = [{"rate": 0.1, "alpha": 0.2}, {"rate": 0.3, "alpha": 0.4}, {"rate": 0.5, "alpha": 0.5}]


def test_alpha_rule_is_the_row_at_or_below():
    from routet2i.alpha_table import alpha_at_rate, table_rows

    rates, alphas = table_rows(list(reversed(TABLE)))  # any order in routing.json
    assert (rates, alphas) == ([0.1, 0.3, 0.5], [0.2, 0.4, 0.5])
    assert alpha_at_rate(rates, alphas, 0.3) == (0.4, 1.0)
    assert alpha_at_rate(rates, alphas, 0.1 + 0.2) == (0.4, 1.0)  # 0.30000000000000004: float noise
    assert alpha_at_rate(rates, alphas, 0.29) == (0.2, 1.0)  # not interpolated towards 0.4
    assert alpha_at_rate(rates, alphas, 0.9) == (0.5, 1.0)
    assert alpha_at_rate(rates, alphas, 0.0) == (0.0, 1.0)
    assert alpha_at_rate(rates, alphas, 0.05) == (0.2, pytest.approx(0.5))
    for bad in (-0.1, 1.5, float("nan"), True):
        with pytest.raises(UsageError, match="rate"):
            alpha_at_rate(rates, alphas, bad)
    for bad_table in ([], [{"rate": 0.1}], "0.1"):
        with pytest.raises(UsageError, match="calibration"):
            table_rows(bad_table)


def test_training_export_and_device_agree_on_alpha():
    np = pytest.importorskip("numpy")
    from routet2i.export.router import pick_alpha
    from routet2i.policy import CalibrationTable
    from routet2i.training.calibration import alpha_from_table, calibration_table

    table = calibration_table(np.random.default_rng(0).uniform(0.1, 0.9, 300))
    device = CalibrationTable.from_routing({"calibration": table})
    for rate in [0.0, 0.005, 0.1, 0.254, 0.3, 0.31, 0.5, 0.777, 1.0]:
        a_dev, keep = device.alpha(rate)
        assert keep == 1.0
        assert pick_alpha(table, rate) == a_dev
        assert alpha_from_table(table, rate) == a_dev
    assert alpha_from_table(table, 0.254) == next(r["alpha"] for r in table if r["rate"] == 0.25)


def test_atomic_write_mode_rule_and_failure(tmp_path):
    import os

    from routet2i.paths import atomic_path, atomic_write

    old = os.umask(0o027)
    try:
        p = atomic_write(tmp_path / "sub" / "report.json", '{"a": 1}')
        assert p.read_text() == '{"a": 1}' and (p.stat().st_mode & 0o777) == 0o640  # 0o666 & ~umask
        s = atomic_write(tmp_path / "state.json", b"{}", private=True, fsync=False)
        assert (s.stat().st_mode & 0o777) == 0o600
        os.chmod(p, 0o600)
        atomic_write(p, "new")  # replacing does not keep the old mode: the rule decides
        assert (p.stat().st_mode & 0o777) == 0o640 and p.read_text() == "new"
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert p.read_text() == "new" and sorted(x.name for x in p.parent.iterdir()) == ["report.json"]


def test_one_atomic_write_helper():
    """Files written whole go through routet2i.paths; os.replace / mkstemp elsewhere only publish folders."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    allowed = {"sdk/paths.py", "training/demo.py"}  # the helper; a folder publisher
    offenders = []
    for folder in ("sdk", "export", "training", "cloud_server"):
        for f in (repo / folder).rglob("*.py"):
            rel = f.relative_to(repo).as_posix()
            if rel not in allowed and re.search(r"os\.replace\(|mkstemp\(", f.read_text(encoding="utf-8")):
                offenders.append(rel)
    assert not offenders, f"write files through routet2i.paths.atomic_write/atomic_path: {offenders}"


def test_one_seed_bound_client_pipeline_server_and_wire():
    """uint64 everywhere: the proto's seed fields, EdgeClient, EdgePipeline and the cloud's validation."""
    from PIL import Image
    from routet2i import EdgeClient
    from routet2i.cloud.v1 import cloud_pb2
    from routet2i.seed import SEED_MAX, check_seed

    assert SEED_MAX == 2**64 - 1
    for msg in (cloud_pb2.GenerateRequest, cloud_pb2.GenerateResponse):
        assert msg.DESCRIPTOR.fields_by_name["seed"].type == msg.DESCRIPTOR.fields_by_name["seed"].TYPE_UINT64
    assert cloud_pb2.GenerateRequest(seed=SEED_MAX).seed == SEED_MAX
    assert check_seed(SEED_MAX) == SEED_MAX and check_seed(None) is None
    for bad in (-1, SEED_MAX + 1, 1.0, True, "3"):
        with pytest.raises(UsageError, match="seed"):
            check_seed(bad)

    seen = []

    def edge(prompt, **kw):
        seen.append(kw["seed"])
        return Image.new("RGB", (8, 8))

    client = EdgeClient(edge=edge, state_file="", decision_log="")
    try:
        assert client.generate("a fox", seed=SEED_MAX, force="edge").seed == SEED_MAX and seen == [SEED_MAX]
        with pytest.raises(UsageError, match="seed"):
            client.generate("a fox", seed=SEED_MAX + 1, force="edge")
        drawn = [
            client.generate("a fox", force="edge").seed for _ in range(8)
        ]  # the client draws from the whole range
        assert all(0 <= s <= SEED_MAX for s in drawn) and max(drawn) > 2**32
    finally:
        client.close()


def test_seed_bound_in_the_server():
    """(EdgePipeline's bound: tests/test_edge_pipeline.py, test_largest_seed_is_uint64_max and bad input.)"""
    from routet2i.cloud_server.core import GenerateInput, ServerConfig, validate
    from routet2i.cloud_server.errors import InvalidArgument
    from routet2i.cloud_server.pipelines import NoOpPipeline
    from routet2i.seed import SEED_MAX

    cfg = ServerConfig()
    assert (
        validate(GenerateInput(request_id="", prompt="x", seed=SEED_MAX), cfg, NoOpPipeline()).seed
        == SEED_MAX
    )
    with pytest.raises(InvalidArgument, match="seed"):
        validate(GenerateInput(request_id="", prompt="x", seed=SEED_MAX + 1), cfg, NoOpPipeline())


def test_export_library_logs_and_only_the_cli_prints():
    """export/*: no print() outside the commands' run(); progress goes through logging."""
    import ast
    from pathlib import Path

    offenders = []
    for f in sorted((Path(__file__).resolve().parent.parent / "export").glob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name != "run":
                for node in ast.walk(fn):
                    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                        offenders.append(f"{f.name}:{node.lineno} in {fn.name}()")
    assert not offenders, offenders


def test_cli_progress_shows_info_on_stdout_and_forwards_the_rest(capsys):
    import logging

    from routet2i.export._log import cli_progress

    log = logging.getLogger("routet2i.export.edge")
    log.info("[export edge] before")  # a library caller sees nothing unless it configures logging
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append((record.levelname, record.getMessage()))

    root = logging.getLogger()
    collect, level = Collect(), root.level
    root.addHandler(collect)
    root.setLevel(logging.WARNING)
    try:
        with cli_progress():
            log.info("[export edge] 1/6 export: %s", "done")
            log.warning("slow")
            log.debug("detail")
    finally:
        root.removeHandler(collect)
        root.setLevel(level)
    assert capsys.readouterr().out == "[export edge] 1/6 export: done\n"
    assert seen == [("WARNING", "slow")]  # not the INFO line twice, not DEBUG at WARNING
    assert logging.getLogger("routet2i.export").propagate
