"""The RouteT2I router model: shapes, masking, ablation switches, determinism, ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from routet2i.training.model import EncodedRouter, RouterConfig, RouteT2IRouter

D = 32


def _cfg(**kw) -> RouterConfig:
    base = dict(metrics=["a", "b", "c"], hidden_size=D, top_k=3, rank=4, score_dim=8, dropout=0.0, n_heads=4)
    base.update(kw)
    return RouterConfig(**base)


def _batch(lengths: list[int], n: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(len(lengths), n, D, generator=g)
    mask = torch.zeros(len(lengths), n, dtype=torch.int64)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return states, mask


def _randomize_heads(model: RouteT2IRouter) -> None:
    with torch.no_grad():  # heads start at zero (PRS^ = 0.5); give them weights so outputs vary
        model.head_w.normal_(0, 1)
        model.head_b.normal_(0, 0.1)


def test_shapes_and_ranges() -> None:
    torch.manual_seed(0)
    model = RouteT2IRouter(_cfg()).eval()
    _randomize_heads(model)
    states, mask = _batch([9, 5, 1])
    prs, scores = model.forward_states(states, mask)
    assert prs.shape == (3,) and scores.shape == (3, 3)
    assert torch.all((scores > 0) & (scores < 1))
    assert torch.allclose(prs, scores.mean(dim=1), atol=1e-6)  # uniform weights


def test_weights_are_normalized_and_used() -> None:
    torch.manual_seed(0)
    model = RouteT2IRouter(_cfg(weights=[2.0, 1.0, 1.0])).eval()
    _randomize_heads(model)
    prs, scores = model.forward_states(*_batch([6, 7]))
    assert torch.allclose(prs, scores @ torch.tensor([0.5, 0.25, 0.25]), atol=1e-6)


def test_padding_is_never_selected_and_k_per_expert() -> None:
    torch.manual_seed(0)
    model = RouteT2IRouter(_cfg(top_k=3)).eval()
    states, mask = _batch([9, 5, 2, 1])
    states[1:, 5:] = 50.0  # huge padding states would win the gate if masking failed
    logits = torch.einsum("bnd,kd->bkn", states, model.expert_emb).masked_fill(~mask.bool()[:, None], -1e9)
    idx, keep = model.select(logits, mask.bool())
    assert idx.shape == keep.shape == (4, 3, 3)  # [B, k, K] whatever the prompt length
    lengths = mask.sum(dim=1)
    assert torch.all(idx[keep] < lengths[:, None, None].expand_as(idx)[keep])  # kept = real tokens only
    assert keep.sum(dim=-1).tolist() == [[3] * 3, [3] * 3, [2] * 3, [1] * 3]  # min(K, valid length)
    # The kept tokens are the K largest gate logits among the valid ones.
    for b in (0, 1):
        top = logits[b, 0].topk(3).indices.sort().values
        assert torch.equal(idx[b, 0].sort().values, top)


def test_padding_content_does_not_change_outputs() -> None:
    torch.manual_seed(0)
    model = RouteT2IRouter(_cfg(n_layers=1)).eval()
    _randomize_heads(model)
    states, mask = _batch([4, 7])
    out1 = model.forward_states(states, mask)
    states2 = states.clone()
    states2[0, 4:] = torch.randn(5, D) * 100
    out2 = model.forward_states(states2, mask)
    assert torch.allclose(out1[0], out2[0], atol=1e-5)
    # Trimming the padding away gives the same answer (static shapes, length-independent).
    out3 = model.forward_states(states[:1, :4], mask[:1, :4])
    assert torch.allclose(out1[0][:1], out3[0], atol=1e-5)


def test_token_selection_changes_pooling() -> None:
    torch.manual_seed(0)
    on = RouteT2IRouter(_cfg(top_k=2)).eval()
    _randomize_heads(on)
    off = RouteT2IRouter(_cfg(top_k=2, token_selection=False)).eval()
    off.load_state_dict(on.state_dict())
    states, mask = _batch([9, 8])
    assert not torch.allclose(on.forward_states(states, mask)[1], off.forward_states(states, mask)[1])
    # K >= n is the same as no token selection.
    big = RouteT2IRouter(_cfg(top_k=50)).eval()
    big.load_state_dict(on.state_dict())
    assert torch.allclose(big.forward_states(states, mask)[1], off.forward_states(states, mask)[1], atol=1e-6)


def test_ablation_switches_change_the_architecture() -> None:
    full = RouteT2IRouter(_cfg())
    no_mm = RouteT2IRouter(_cfg(multimetric=False))
    no_dual = RouteT2IRouter(_cfg(dual_gate=False))
    assert full.expert_emb.shape[0] == 3 and no_mm.expert_emb.shape[0] == 1
    assert no_mm.config.score_names == ["prs"]
    assert no_mm.forward_states(*_batch([3, 4]))[1].shape == (2, 1)
    assert full.p_neg is not None and no_dual.p_neg is None
    n_full = sum(p.numel() for p in full.parameters())
    n_dual = sum(p.numel() for p in no_dual.parameters())
    assert n_full - n_dual == 3 * D * 4  # exactly the P- projections


def test_dual_gate_is_not_a_single_projection() -> None:
    """With the activation after each projection, sigmoid(T+ - T-) is not sigmoid(T (P+ - P-) S)."""
    torch.manual_seed(0)
    m = RouteT2IRouter(_cfg())
    x = torch.randn(5, D)
    lin = torch.einsum("nd,dl,lh->nh", x, m.p_pos[0] - m.p_neg[0], m.score[0])
    nonlin = m.act(x @ m.p_pos[0]) @ m.score[0] - m.act(x @ m.p_neg[0]) @ m.score[0]
    assert not torch.allclose(lin, nonlin, atol=1e-3)


def test_deterministic_with_seed() -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = RouteT2IRouter(_cfg()).eval()
        _randomize_heads(model)
        outs.append(model.forward_states(*_batch([5, 9]))[0])
    assert torch.equal(outs[0], outs[1])


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="activation"):
        RouteT2IRouter(_cfg(activation="swishy"))
    with pytest.raises(ValueError, match="n_heads"):
        RouteT2IRouter(_cfg(n_layers=1, n_heads=5))
    with pytest.raises(ValueError, match="weights"):
        RouteT2IRouter(_cfg(weights=[1.0, 2.0]))


class _TinyEncoder(torch.nn.Module):
    """Stands in for the HF encoder: embeddings -> last_hidden_state (keeps the test fast and offline)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(100, D)

    def forward(self, input_ids, attention_mask):
        class _Out:
            pass

        out = _Out()
        out.last_hidden_state = self.emb(input_ids)
        return out


def test_onnx_export_dynamic_batch_and_length(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    router = RouteT2IRouter(_cfg(n_layers=1)).eval()
    _randomize_heads(router)
    model = EncodedRouter(_TinyEncoder(), router).eval()
    ids = torch.randint(1, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.int64)
    path = tmp_path / "router.onnx"
    torch.onnx.export(
        model,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["prs", "metric_scores"],
        dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}},
        opset_version=17,
        dynamo=False,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids2 = torch.randint(1, 100, (3, 11))
    mask2 = torch.ones(3, 11, dtype=torch.int64)
    mask2[1, 4:] = 0
    mask2[2, 1:] = 0  # a one-token prompt: fewer tokens than K
    got = sess.run(None, {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()})
    with torch.no_grad():
        want = model(ids2, mask2)
    np.testing.assert_allclose(got[0], want[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[1], want[1].numpy(), atol=1e-5)
    assert got[1].shape == (3, 3)
