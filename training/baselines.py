"""Routing methods besides RouteT2I (ROUTET2I.md section 6) and the registry of every method.

Every trained baseline uses the same frozen backbone token states as RouteT2I, mean-pooled over the valid
tokens, with a small head (``PooledRouter``) trained by the same trainer, budget, early stopping and splits
(``train.py``). Only the label and the loss differ:

- ``routellm_bert``: classifier of y = 1[Q_c > Q_e] (RouteLLM's BERT router, BCE); the highest P(cloud wins)
  goes to the cloud. RouteLLM fine-tunes BERT; here the head sits on the frozen backbone like RouteT2I.
- ``hybrid_llm``: classifier of y = 1[Q_e >= Q_c - t*] with t* the median training gap, so the labels
  balance (Ding et al., ICLR 2024); the lowest P goes to the cloud.
- ``zooter``: two logits regressed to softmax([Q_e, Q_c] / tau) with a KL loss (Lu et al., 2023); the
  highest predicted cloud share goes to the cloud.
- ``gap_regression`` (ours, beyond the paper's list): MSE regression of the combined gap Q_c - Q_e; the
  largest predicted gap goes to the cloud. The prototype of ROUTET2I.md section 8 found this the strongest.

Rule-based methods (not trained): ``random``, ``noun_count`` (most nouns -> cloud) and ``oracle`` (the true
gap; an upper bound, not a router).

Every method is reduced to one routing score, lower = more in need of the cloud; trained ones expose it as
``prs`` in (0, 1) so that one calibration rule (alpha = min(0.5, quantile)) and one export path serve all.
Q is the combined quality of ROUTET2I.md section 5: each metric divided by its pooled standard deviation
(both models), weighted and summed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from routet2i.training.methods import ABLATIONS, METHODS, RULE_METHODS, TRAINED_BASELINES
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ABLATIONS",
    "TRAINED_BASELINES",
    "RULE_METHODS",
    "BaselineConfig",
    "PooledRouter",
    "build_baseline_router",
    "combined_quality",
    "baseline_targets",
    "baseline_loss",
    "rule_scores",
]


@dataclass
class BaselineConfig:
    """Head of a trained baseline on mean-pooled backbone token states; stored in router.pt."""

    method: str = "routellm_bert"  # one of TRAINED_BASELINES: fixes the label, loss and output mapping
    backbone: str = ""  # HF id or folder of the token encoder; "" = the packaged all-MiniLM-L6-v2
    hidden_size: int = 384  # d: width of the backbone token states
    max_length: int = 128  # tokenizer truncation length
    hidden: int = 64  # width of the MLP hidden layer; 0 = a linear head
    dropout: float = 0.1  # dropout on the pooled state and the hidden layer (training only)
    tau: float = 1.0  # zooter: temperature of the target softmax over [Q_e, Q_c]
    gap_scale: float = 1.0  # gap_regression: prs = sigmoid(-predicted gap / gap_scale) (routing ignores it)

    @property
    def score_names(self) -> list[str]:
        return ["prs"]

    @property
    def n_outputs(self) -> int:
        return 2 if self.method == "zooter" else 1


class PooledRouter(nn.Module):
    """Masked mean of token states -> MLP -> raw outputs; ``forward_states`` maps them to a PRS-like score."""

    def __init__(self, config: BaselineConfig) -> None:
        super().__init__()
        if config.method not in TRAINED_BASELINES:
            raise ValueError(
                f"method={config.method!r}; trained baselines are {', '.join(TRAINED_BASELINES)}"
            )
        self.config = config
        d, o = config.hidden_size, config.n_outputs
        if config.hidden > 0:
            self.mlp = nn.Sequential(
                nn.Dropout(config.dropout),
                nn.Linear(d, config.hidden),
                nn.GELU(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, o),
            )
        else:
            self.mlp = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(d, o))

    def raw(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, n_outputs]: logits (classifiers, zooter) or the predicted gap (gap_regression)."""
        m = attention_mask.to(states.dtype)[..., None]
        pooled = (states * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self.mlp(pooled)

    def forward_states(
        self, states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(prs [B], prs [B, 1]): lower = the cloud is more needed, in (0, 1)."""
        z = self.raw(states, attention_mask)
        method = self.config.method
        if method == "routellm_bert":
            prs = torch.sigmoid(-z[:, 0])  # 1 - P(cloud wins)
        elif method == "hybrid_llm":
            prs = torch.sigmoid(z[:, 0])  # P(edge is good enough)
        elif method == "zooter":
            prs = z.softmax(dim=-1)[:, 0]  # predicted edge share
        else:
            prs = torch.sigmoid(-z[:, 0] / self.config.gap_scale)  # large predicted gap -> low prs
        return prs, prs[:, None]

    def forward(
        self, states: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_states(states, attention_mask)


def build_baseline_router(method: str, config: dict[str, Any]) -> PooledRouter:
    """Rebuild a trained baseline head from the config dict stored in router.pt."""
    cfg = BaselineConfig(**config)
    if cfg.method != method:
        raise ValueError(f"router.pt says method={method!r} but its config says {cfg.method!r}")
    return PooledRouter(cfg)


def combined_quality(
    q_edge: np.ndarray, q_cloud: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Q_e [n], Q_c [n], sd [k]): metrics divided by their pooled std over both models, weighted, summed."""
    k = q_edge.shape[1]
    w = np.full(k, 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    sd = np.concatenate([q_edge, q_cloud], axis=0).std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return (q_edge / sd) @ w, (q_cloud / sd) @ w, sd


def baseline_targets(method: str, q_e: np.ndarray, q_c: np.ndarray, tau: float = 1.0) -> np.ndarray:
    """Training targets [n, n_outputs] of a trained baseline from combined qualities of the training set."""
    gap = q_c - q_e
    if method == "routellm_bert":
        return (gap > 0).astype(np.float32)[:, None]
    if method == "hybrid_llm":
        t_star = float(np.median(gap))  # balances the labels (ties at the median go to "edge good enough")
        return (gap <= t_star).astype(np.float32)[:, None]
    if method == "zooter":
        z = np.stack([q_e, q_c], axis=1) / tau
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    if method == "gap_regression":
        return gap.astype(np.float32)[:, None]
    raise ValueError(f"method={method!r} is not a trained baseline ({', '.join(TRAINED_BASELINES)})")


def baseline_loss(method: str, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean loss of a trained baseline: BCE for the classifiers, KL for zooter, MSE for the gap."""
    if method in ("routellm_bert", "hybrid_llm"):
        return F.binary_cross_entropy_with_logits(raw, target)
    if method == "zooter":
        return F.kl_div(raw.log_softmax(dim=-1), target, reduction="batchmean")
    return F.mse_loss(raw, target)


def rule_scores(
    method: str,
    rng: np.random.Generator,
    n: int,
    gap: np.ndarray | None = None,
    nouns: np.ndarray | None = None,
) -> np.ndarray:
    """Routing scores [n] of a rule method (lower = cloud). Ties are broken at random by the router."""
    if method == "random":
        return rng.random(n)
    if method == "noun_count":
        if nouns is None:
            raise ValueError("noun_count needs the noun counts")
        return -np.asarray(nouns, dtype=np.float64)
    if method == "oracle":
        if gap is None:
            raise ValueError("oracle needs the true gap Q_c - Q_e")
        return -np.asarray(gap, dtype=np.float64)
    raise ValueError(f"method={method!r} is not a rule method ({', '.join(RULE_METHODS)})")
