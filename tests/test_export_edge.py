"""`routet2i export edge` on the tiny SD2.1-shaped pipeline: optimum layout, validation, manifest, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from routet2i.training.cli import main


@pytest.fixture(scope="module")
def edge_bundle(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from routet2i.export.edge import EdgeExportConfig, export_edge

    out = tmp_path_factory.mktemp("edge") / "bundle"
    result = export_edge(EdgeExportConfig(pipeline=str(tiny_models["edge-sd21"]), out=out))
    assert result.pipeline_validated and all(g.validated for g in result.graphs.values())
    return out


def test_layout_and_manifest(edge_bundle: Path) -> None:
    from routet2i.bundle import verify_manifest

    for rel in (
        "model_index.json",
        "text_encoder/model.onnx",
        "unet/model.onnx",
        "vae_decoder/model.onnx",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/tokenizer.json",
    ):
        assert (edge_bundle / rel).is_file(), rel
    manifest = verify_manifest(edge_bundle, kind="edge")
    assert "unet/model.onnx" in manifest["files"]
    edge = manifest["edge"]
    assert edge["image_size"]["multiple_of"] == 64 and edge["image_size"]["default"] == [64, 64]
    assert edge["prediction_type"] == "v_prediction"
    validation = edge["validation"]
    assert validation["pipeline_validated"] and validation["pipeline_max_abs_diff"] < 2e-3
    assert set(validation["graphs_validated"]) >= {"text_encoder", "unet", "vae_decoder"}
    assert manifest["versions"]["onnxruntime"]
    assert not [p for p in edge_bundle.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_optimum_ort_pipeline_loads_and_generates(edge_bundle: Path, tiny_models: dict[str, Path]) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    ort_pipe = ORTStableDiffusionPipeline.from_pretrained(edge_bundle)
    torch_pipe = StableDiffusionPipeline.from_pretrained(tiny_models["edge-sd21"])
    images = []
    for pipe in (ort_pipe, torch_pipe):
        images.append(
            pipe(
                "a lighthouse on a cliff",
                num_inference_steps=3,
                height=128,  # not the validated size: the graphs are dynamic in height/width
                width=64,
                generator=torch.Generator().manual_seed(1),
                output_type="np",
            ).images
        )
    assert images[0].shape == (1, 128, 64, 3)
    assert np.abs(images[0] - images[1]).max() < 2e-3


def test_tokenizer_json_runs_without_transformers(edge_bundle: Path) -> None:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(edge_bundle / "tokenizer" / "tokenizer.json")).encode("a red fox").ids
    vocab = json.loads((edge_bundle / "tokenizer" / "vocab.json").read_text())
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]


def test_tampered_file_fails_manifest(edge_bundle: Path, tmp_path: Path) -> None:
    from routet2i._errors import BundleError
    from routet2i.bundle import verify_manifest

    copy = tmp_path / "bundle"
    shutil.copytree(edge_bundle, copy)
    path = copy / "unet" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="unet/model.onnx"):
        verify_manifest(copy, kind="edge")


def test_refuses_existing_out_without_force(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep").write_text("x")
    assert main(["export", "edge", "--pipeline", str(tiny_models["edge-sd21"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--out" in err and "--force" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep"]


@pytest.mark.parametrize("what", ["sd3", "sd15-like", "not-a-pipeline"])
def test_refuses_non_sd21_pipelines(tiny_models: dict[str, Path], tmp_path: Path, capsys, what: str) -> None:
    if what == "sd3":
        pipeline = tiny_models["cloud-sd3"]
        expect = "StableDiffusion3Pipeline"
    elif what == "sd15-like":
        pipeline = tmp_path / "sd15"
        shutil.copytree(tiny_models["edge-sd21"], pipeline)
        config = json.loads((pipeline / "unet" / "config.json").read_text())
        config["use_linear_projection"] = False
        (pipeline / "unet" / "config.json").write_text(json.dumps(config))
        expect = "use_linear_projection=False"
    else:
        pipeline = tmp_path / "empty"
        pipeline.mkdir()
        expect = "model_index.json"
    out = tmp_path / "bundle"
    assert main(["export", "edge", "--pipeline", str(pipeline), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_refuses_sizes_not_multiple_of_64(tiny_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    args = ["export", "edge", "--pipeline", str(tiny_models["edge-sd21"]), "--out", str(tmp_path / "b")]
    assert main([*args, "--sizes", "512x520"]) == 2
    assert "multiples of 64" in capsys.readouterr().err


def test_validation_failure_is_typed_and_leaves_nothing(
    tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from routet2i.export import edge
    from routet2i.export.specs import ExportValidationError

    real = edge._torch_reference

    def broken(pipe, name, feeds):  # a torch reference the ONNX UNet cannot match
        out = real(pipe, name, feeds)
        return {k: v + 1.0 for k, v in out.items()} if name == "unet" else out

    monkeypatch.setattr(edge, "_torch_reference", broken)
    out = tmp_path / "bundle"
    with pytest.raises(ExportValidationError) as info:
        edge.export_edge(
            edge.EdgeExportConfig(pipeline=str(tiny_models["edge-sd21"]), out=out, vae_encoder=False)
        )
    failures = info.value.failures
    assert {(f.graph, f.output) for f in failures} == {("unet", "out_sample")}
    assert {f.case.split()[0] for f in failures} == {"batch=1", "batch=2"}
    assert "unet.out_sample" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_fp16_optimized_gpu_bundle_records_what_was_not_validated(
    tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """--optimize (GPU fusions) + --fp16: ORT's UNet attention fusion runs (numpy-2 fix), the CUDA-only
    fused graphs are recorded as not validated, the CPU-runnable text encoder is validated in fp16."""
    from routet2i.bundle import verify_manifest
    from routet2i.export.edge import EdgeExportConfig, export_edge

    out = tmp_path / "gpu"
    result = export_edge(
        EdgeExportConfig(
            pipeline=str(tiny_models["edge-sd21"]), out=out, fp16=True, optimize=True, vae_encoder=False
        )
    )
    assert result.graphs["unet"].fused_ops.get("MultiHeadAttention", 0) > 0
    assert result.graphs["unet"].fused_ops.get("GroupNorm", 0) > 0
    assert result.graphs["text_encoder"].validated and result.graphs["text_encoder"].dtype == "float16"
    assert not result.graphs["unet"].validated and "NhwcConv" in result.graphs["unet"].not_validated_reason
    assert not result.pipeline_validated
    edge = verify_manifest(out, kind="edge")["edge"]
    assert edge["execution"] == "gpu" and "unet" in edge["validation"]["graphs_not_validated"]
    assert edge["graphs"]["unet"]["fp32_kept"]  # attention score path kept in float32


@pytest.mark.slow
def test_fp16_and_cpu_optimized_bundles_validate(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from routet2i.export.edge import EdgeExportConfig, export_edge

    for name, kwargs in {"fp16": {"fp16": True}, "opt": {"optimize": True, "optimize_target": "cpu"}}.items():
        result = export_edge(
            EdgeExportConfig(pipeline=str(tiny_models["edge-sd21"]), out=tmp_path / name, **kwargs)
        )
        assert result.pipeline_validated, name


def test_fast_tokenizer_made_from_slow_files(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A pipeline that ships only vocab.json/merges.txt (as SD2.1 does) still gets tokenizer.json."""
    from routet2i.export.edge import _write_fast_tokenizer
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_models["edge-sd21"] / "tokenizer", folder)
    (folder / "tokenizer.json").unlink()
    _write_fast_tokenizer(None, folder)
    fast, slow = Tokenizer.from_file(str(folder / "tokenizer.json")), CLIPTokenizer.from_pretrained(folder)
    assert fast.encode("two cats on a sofa").ids == slow("two cats on a sofa").input_ids


@pytest.mark.slow
def test_full_size_unet_bench_runs() -> None:
    """bench/bench_export_unet.py at full size (865.9M parameters): minutes and ~10 GB of memory."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_export_unet.py"
    proc = subprocess.run(
        [sys.executable, str(bench), "--runs", "1", "--batch", "1"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "865.9M" in proc.stdout and "ratio ORT / torch" in proc.stdout
