"""Fine-tuning screen on EvalMi-50K (issue 15): MiniLM's top layers trained with a gap head, 5 folds, 1 seed.

Same folds and Delta P as `routet2i eval` (``folds_by_text``, seed --seed), but one seed only: a screen of
whether fine-tuning moves the number at all on 2 CPU cores, not a measurement for the tables. The model:
all-MiniLM-L6-v2 with its last --layers transformer layers trainable (lr --lr), every layer's states
mean-pooled and averaged (as the default router), a linear head regressing the standardized combined gap
(lr 1e-3), --epochs epochs of batch 32. Data read from ../shared/data, never copied; aggregate output only.

    nice .venv/bin/python bench/router_finetune_screen.py [--layers 2] [--epochs 3] [--seed 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from router_evalmi50k import OUT, TABLE, load  # noqa: E402


def fit_predict(pair, gap, train, test, layers, epochs, lr, seed) -> np.ndarray:
    from routet2i.training.model import load_backbone

    torch.manual_seed(seed)
    encoder, tok = load_backbone("")
    n_layers = len(encoder.encoder.layer)
    for i, layer in enumerate(encoder.encoder.layer):
        for p in layer.parameters():
            p.requires_grad_(i >= n_layers - layers)
    head = torch.nn.Linear(encoder.config.hidden_size, 1)
    mu, sd = gap[train].mean(), gap[train].std()
    y = torch.tensor((gap - mu) / sd, dtype=torch.float32)
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": lr},
            {"params": head.parameters(), "lr": 1e-3},
        ],
        weight_decay=1e-2,
    )

    def pooled(idx):
        enc = tok(
            [pair.prompts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        hs = encoder(**enc, output_hidden_states=True).hidden_states
        m = enc["attention_mask"].float()[..., None]
        return torch.stack([(h * m).sum(1) / m.sum(1) for h in hs]).mean(0)

    g = np.random.default_rng(seed)
    for _ in range(epochs):
        encoder.train()
        order = g.permutation(train)
        for s in range(0, len(order), 32):
            b = order[s : s + 32]
            loss = torch.nn.functional.mse_loss(head(pooled(b))[:, 0], y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    encoder.eval()
    with torch.no_grad():
        return -torch.cat([head(pooled(test[s : s + 128]))[:, 0] for s in range(0, len(test), 128)]).numpy()


def main() -> int:
    from routet2i.training.baselines import combined_quality
    from routet2i.training.evaluate import _bootstrap, cloud_mask, delta_p_curve, folds_by_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--seed", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    if not TABLE.is_file():
        print(f"skipped: {TABLE} is not there", file=sys.stderr)
        return 0
    torch.set_num_threads(1)
    pair = load()
    w = np.full(len(pair.metrics), 1.0 / len(pair.metrics))
    q_e, q_c, _ = combined_quality(pair.q_edge, pair.q_cloud, w)
    gap = q_c - q_e
    fold_id = folds_by_text(pair.prompts, args.folds, seed=args.seed)
    scores = np.zeros(len(pair))
    t0 = time.perf_counter()
    for f in range(args.folds):
        test, train = np.flatnonzero(fold_id == f), np.flatnonzero(fold_id != f)
        scores[test] = fit_predict(
            pair, gap, train, test, args.layers, args.epochs, args.lr, args.seed * 100 + f
        )
        print(f"fold {f}: {time.perf_counter() - t0:.0f} s", flush=True)
    tb = np.random.default_rng(2000 + args.seed).permutation(len(pair))
    dp = delta_p_curve(scores, fold_id, gap[:, None], tb, np.array([0.3, 0.5, 0.7]))[:, 0]
    lo, hi = _bootstrap(cloud_mask(scores, fold_id, 0.5, tb)[None].astype(np.float64), gap, 1000, seed=3000)
    key = f"sd3_5_large:finetune_top{args.layers}_e{args.epochs}_lr{args.lr:g}:seeds{args.seed}+1"
    r = {
        "delta_p": {"0.3": float(dp[0]), "0.5": float(dp[1]), "0.7": float(dp[2])},
        "delta_p_std_0.5": 0.0,
        "ci95_0.5": [lo, hi],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"{key}: dP@30 {dp[0]:.1f} dP@50 {dp[1]:.1f} [{lo:.1f}, {hi:.1f}] dP@70 {dp[2]:.1f}")
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    results[key] = r
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
