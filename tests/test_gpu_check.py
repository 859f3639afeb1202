"""bench/gpu_check.py --tiny end to end (CPU), and the export fixes the first GPU run led to."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("diffusers")


def test_gpu_check_tiny_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.md").read_text().startswith("# GPU check report")
    sections = report["sections"]
    assert set(sections) == {"unet", "bundles", "cloud", "router"}
    assert all(s["status"] == "ok" for s in sections.values()), {
        k: s.get("error") for k, s in sections.items()
    }
    assert report["environment"]["device"] == "cpu"

    unet = sections["unet"]
    assert unet["torch"]["p50_ms"] > 0
    fp32 = unet["ort"]["fp32"]  # ORT CPU on the fp32 export: the numbers agree with torch
    assert fp32["status"] == "ok" and fp32["finite"]
    assert fp32["max_abs_diff_vs_torch_fp32"] < 1e-3
    assert fp32["product"]["p50_ms"] > 0 and math.isfinite(fp32["product"]["ratio_vs_torch"])
    # the fused graph holds CUDA-only ops: the CPU provider cannot run it, and the report says so
    assert unet["ort"]["fp16_optimized"]["status"] == "skipped"
    assert (
        "NhwcConv" in unet["ort"]["fp16_optimized"]["why"] or "kernel" in unet["ort"]["fp16_optimized"]["why"]
    )
    assert unet["prepare"]["fp16_optimized_fusions"]

    bundles = sections["bundles"]["variants"]
    assert set(bundles) == {"fp16"}
    # graphs that CPU can run were compared with torch fp32 within the spec's tolerance
    te = bundles["fp16"]["graphs"]["text_encoder"]
    assert te["passed"] and te["max_abs_diff"] <= te["atol"]

    cloud = sections["cloud"]
    assert cloud["max_batch_1_images_per_s"] > 0 and cloud["max_batch_4_images_per_s"] > 0

    router = sections["router"]["results"]["CPUExecutionProvider"]
    assert router["batch1"]["p50_ms"] > 0 and router["batch1"]["n"] == 60


def test_gpu_check_refuses_unknown_section(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(tmp_path), "--only", "unet,gpus"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--only gpus: allowed unet, bundles, cloud, router" in proc.stderr


def _graph_with_duplicate_casts():
    from onnx import TensorProto, helper

    cast = helper.make_node("Cast", ["x16"], ["x32"], to=TensorProto.FLOAT, name="x16_cast_to_fp32_node")
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="to16"),
        cast,
        helper.make_node("Cast", ["x16"], ["x32"], to=TensorProto.FLOAT, name="x16_cast_to_fp32_node"),
        helper.make_node("Relu", ["x32"], ["a"], name="relu"),
        helper.make_node("Sigmoid", ["x32"], ["b"], name="sigmoid"),
        helper.make_node("Add", ["a", "b"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        value_info=[helper.make_tensor_value_info("x32", TensorProto.FLOAT, [2])] * 2,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_duplicate_cast_nodes_of_old_float16_converters_are_removed() -> None:
    """onnxruntime < 1.32 leaves one identical Cast per blocked consumer; ORT 1.30 refused such a UNet."""
    import onnxruntime as ort
    from routet2i.export.edge import _drop_duplicate_nodes

    model = _graph_with_duplicate_casts()
    assert _drop_duplicate_nodes(model.graph) == 1
    assert [n.name for n in model.graph.node].count("x16_cast_to_fp32_node") == 1
    assert len(model.graph.value_info) == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([-1.0, 2.0], dtype=np.float32)
    (y,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y, np.maximum(x, 0) + 1 / (1 + np.exp(-x)), rtol=1e-3)
    assert _drop_duplicate_nodes(model.graph) == 0


def test_fp32_attention_rule_keeps_unet_mid_block_feed_forward_in_fp16() -> None:
    """The VAE mid-block attention stays fp32; the UNet mid block's GEGLU feed-forward does not (its Slice
    output feeds two nodes, which old float16 converters turned into duplicate Casts)."""
    from onnx import TensorProto, helper
    from routet2i.export.edge import _fp32_attention_nodes

    names = [
        ("/decoder/mid_block/attentions.0/MatMul", "MatMul"),  # VAE mid-block attention score
        ("/mid_block/attentions.0/transformer_blocks.0/attn1/MatMul", "MatMul"),  # UNet attention score
        ("/mid_block/attentions.0/transformer_blocks.0/ff/net.0/Mul", "Mul"),  # UNet GEGLU
        ("/mid_block/attentions.0/transformer_blocks.0/attn1/to_q/MatMul", "MatMul"),  # projection
    ]
    nodes = [helper.make_node(op, ["x"], [f"y{i}"], name=n) for i, (n, op) in enumerate(names)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [])
    assert _fp32_attention_nodes(helper.make_model(graph)) == [names[0][0], names[1][0]]


def test_bias_split_gelu_fusion_only_for_widths_its_kernel_takes(tmp_path: Path) -> None:
    from routet2i.export.edge import _bias_split_gelu_supported

    sys.path.insert(0, str(REPO / "bench"))
    from _sd21 import SD21_BASE_UNET

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(SD21_BASE_UNET))
    assert _bias_split_gelu_supported(cfg)
    cfg.write_text(json.dumps({**SD21_BASE_UNET, "block_out_channels": [32, 32, 64, 64]}))
    assert not _bias_split_gelu_supported(cfg)  # 256/512: "hidden size should be 2560, 5120, ..."
    assert not _bias_split_gelu_supported(tmp_path / "missing.json")
