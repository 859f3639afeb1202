"""The registry of routing methods: names, one-line descriptions, kinds. Imports nothing heavy.

(The CLI builds its --help from it without importing torch; the methods themselves live in
``model.py`` (RouteT2I and its ablations) and ``baselines.py``.)
"""

from __future__ import annotations

__all__ = ["METHODS", "ABLATIONS", "TRAINED_BASELINES", "POOLED_METHODS", "RULE_METHODS", "DEFAULT_METHOD"]

# name -> one-line description. Order = report order.
METHODS: dict[str, str] = {
    "routet2i": "RouteT2I: dual-gated token-selection MoE, one expert per metric, trained on PRS labels",
    "multitask": "ridge + kernel ridge + multi-task MLP (every model's per-metric score) on the layer-mean "
    "pooled frozen backbone; the default router",
    "routet2i_no_multimetric": "ablation: one expert trained on PRS",
    "routet2i_no_token_selection": "ablation: every token pooled (K = n)",
    "routet2i_no_dual_gate": "ablation: one projection, no positive/negative contrast",
    "routellm_bert": "classifier of 1[Q_c > Q_e] on the pooled backbone (RouteLLM BERT router)",
    "hybrid_llm": "classifier of 1[Q_e >= Q_c - t*], t* balancing the labels (Hybrid LLM)",
    "zooter": "regression of softmax([Q_e, Q_c]/tau) with KL (ZOOTER)",
    "gap_regression": "MSE regression of the combined gap Q_c - Q_e on the pooled backbone (ours)",
    "random": "a random fraction goes to the cloud",
    "noun_count": "the prompts with the most nouns go to the cloud",
    "oracle": "the true gap (upper bound, not a router)",
}
# RouteT2I ablation name -> the RouterConfig switch it turns off.
ABLATIONS: dict[str, str] = {
    "routet2i_no_multimetric": "multimetric",
    "routet2i_no_token_selection": "token_selection",
    "routet2i_no_dual_gate": "dual_gate",
}
TRAINED_BASELINES = ("routellm_bert", "hybrid_llm", "zooter", "gap_regression")
RULE_METHODS = ("random", "noun_count", "oracle")
POOLED_METHODS = ("multitask",)  # fitted on pooled features in closed form / small MLPs (multitask.py)
DEFAULT_METHOD = "multitask"  # `routet2i train` without --method (docs/RESULTS.md: why)
