"""Router decision latency on the device: the RouteT2I router bundle vs a RouteLLM-style BERT-base classifier.

Both run the same way: a router bundle (router.onnx + tokenizer.json + routing.json + manifest) through
`routet2i.router_runtime.RouterSession` (tokenizers + ONNX Runtime, same session options), batch 1, one
decision per real prompt of PartiPrompts, the two interleaved prompt by prompt (order alternating) so both
see the same machine load. A decision = ``predict_one(prompt)``: tokenize, run, read PRS^.

- RouteT2I: ``--router-bundle DIR`` (a trained bundle), else an untrained default RouteT2I router (packaged
  all-MiniLM-L6-v2 backbone, ten metric experts) written with ``save_router`` and exported by
  ``routet2i export router`` once, cached. Latency does not depend on training.
- Anchor: RouteLLM's BERT router architecture, ``BertForSequenceClassification(BertConfig())`` (the
  bert-base-uncased shape: 12 layers, hidden 768, vocab 30522; 3 labels), random weights, exported to ONNX
  with the same graph signature (prs = P(label 1) + P(label 2), metric_scores = the 3 probabilities) and the
  bert-base-uncased WordPiece vocabulary (the one all-MiniLM-L6-v2 ships), max_length 512 as RouteLLM.

Prints p50/p99 per router and the ratios, plus the router's p50 as a share of one edge generation when
``bench_edge.py`` has recorded its per-step time (25 steps x per-step time; a lower bound of a generation,
so the share printed is an upper bound).

    .venv/bin/python bench/bench_router_latency.py [--n 300] [--router-bundle DIR] [--threads 0] [--router-threads 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ROUTET2I_BENCH_CACHE", Path.home() / ".cache" / "routet2i" / "bench"))
PARTI = (
    Path(os.environ.get("ROUTET2I_SHARED_DATA", REPO.parent / "shared" / "data"))
    / "prompts/parti/PartiPrompts.tsv"
)
EDGE_STEPS = 25  # steps of "one edge generation" (EdgePipeline's default)


def _prompts(n: int) -> list[str]:
    if not PARTI.is_file():
        sys.exit(f"bench_router_latency: {PARTI} not found (../shared/data is not part of the repo)")
    rows = PARTI.read_text(encoding="utf-8").splitlines()[1:]
    prompts = [r.split("\t")[0].strip() for r in rows if r.split("\t")[0].strip()]
    rng = np.random.default_rng(0)
    return [prompts[i] for i in rng.permutation(len(prompts))[:n]]


def _default_router_bundle() -> Path:
    """An untrained default RouteT2I router, exported once by `routet2i export router` (cached)."""
    out = CACHE / "router-untrained"
    if (out / "manifest.json").is_file():
        return out
    try:
        import routet2i.export.router  # noqa: F401
    except ImportError:
        sys.exit(
            "bench_router_latency: `routet2i export router` is not available yet; pass --router-bundle DIR"
        )
    import torch
    from routet2i.training.cli import main as routet2i_main
    from routet2i.training.metrics import load_metric_pairs
    from routet2i.training.model import RouterConfig, RouteT2IRouter, save_router

    metrics = [p.metric for p in load_metric_pairs()]
    config = RouterConfig(metrics=metrics)
    torch.manual_seed(0)
    router = RouteT2IRouter(config).eval()
    work = Path(tempfile.mkdtemp(prefix="router-bench-"))
    try:
        save_router(
            work / "ckpt", router, config, config.backbone, method="routet2i", metrics=metrics,
            weights=[1.0] * len(metrics), gamma=0.5, edge_model="sd21-base", cloud_model="sd3-medium",
            dataset="untrained", calibration=[{"rate": 0.3, "alpha": 0.5}, {"rate": 0.5, "alpha": 0.55}],
        )  # fmt: skip
        CACHE.mkdir(parents=True, exist_ok=True)
        code = routet2i_main(
            ["export", "router", "--router", str(work / "ckpt"), "--out", str(out), "--force"]
        )
        if code != 0:
            sys.exit(f"bench_router_latency: routet2i export router exited {code}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _bert_bundle(tokenizer_src: Path) -> Path:
    """RouteLLM-style BERT-base classifier (random weights) as a router bundle, built once (cached)."""
    out = CACHE / "bert-base-router"
    if (out / "manifest.json").is_file():
        return out
    import torch
    from routet2i.bundle import write_manifest
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(num_labels=3)).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            probs = torch.softmax(self.bert(input_ids=input_ids, attention_mask=attention_mask).logits, -1)
            return probs[:, 1] + probs[:, 2], probs

    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bert-base-router.", dir=CACHE))
    try:
        (tmp / "tokenizer").mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
            if (tokenizer_src / name).is_file():
                shutil.copyfile(tokenizer_src / name, tmp / "tokenizer" / name)
        ids = torch.ones((1, 16), dtype=torch.int64)
        axes = {0: "batch", 1: "sequence"}
        torch.onnx.export(
            Wrapped().eval(), (ids, torch.ones_like(ids)), str(tmp / "router.onnx"),
            input_names=["input_ids", "attention_mask"], output_names=["prs", "metric_scores"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "prs": {0: "batch"}, "metric_scores": {0: "batch"}},
            opset_version=18, dynamo=False,
        )  # fmt: skip
        routing = {
            "format_version": 1, "method": "routellm_bert", "metrics": ["label0", "label1", "label2"],
            "weights": [0.0, 1.0, 1.0], "gamma": 0.0, "edge_model": "sd21-base", "cloud_model": "sd3-medium",
            "dataset": "untrained", "calibration": [{"rate": 0.3, "alpha": 0.5}], "target_rate": 0.3,
            "alpha": 0.5, "max_length": 512, "router_version": "bert-base-random",
        }  # fmt: skip
        (tmp / "routing.json").write_text(json.dumps(routing))
        write_manifest(tmp, kind="router")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="prompts (one decision each per router)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed decisions first")
    ap.add_argument(
        "--router-bundle", type=Path, help="a RouteT2I router bundle (default: untrained, exported)"
    )
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument(
        "--router-threads",
        default="0,1",
        help="comma-separated intra-op thread counts to time the RouteT2I router at, each against BERT-base "
        "at --threads, interleaved in the same run (default 0,1: ONNX Runtime's default and RouterSession's "
        "default of one thread); '' : --threads only",
    )
    ap.add_argument(
        "--also-bundle",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="another router bundle timed in the same interleaved loop at 1 thread (repeatable), e.g. the "
        "trained default router against today's RouteT2I bundle",
    )
    args = ap.parse_args()
    router_threads = [int(t) for t in args.router_threads.split(",") if t.strip()] or [args.threads]

    import logging

    from routet2i.ort import SessionConfig
    from routet2i.router_runtime import RouterSession
    from tqdm import tqdm

    logging.getLogger("routet2i.router_runtime").setLevel(logging.ERROR)  # truncation notes: counted below

    prompts = _prompts(args.n + args.warmup)
    print(
        f"{len(prompts)} PartiPrompts (seeded sample), {sum(len(p.split()) for p in prompts) / len(prompts):.1f} words on average"
    )
    router_dir = args.router_bundle or _default_router_bundle()
    bert_dir = _bert_bundle(router_dir / "tokenizer")
    cfg = SessionConfig(intra_op_threads=args.threads)
    sessions = {}
    for t in router_threads:
        name = "routet2i" if len(router_threads) == 1 else (f"routet2i@{t}t" if t else "routet2i@default")
        sessions[name] = RouterSession(router_dir, session_config=SessionConfig(intra_op_threads=t))
    sessions["bert-base"] = RouterSession(bert_dir, session_config=cfg)
    also = []
    for spec in args.also_bundle:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not Path(folder).is_dir():
            sys.exit(
                f"bench_router_latency: --also-bundle {spec!r}: expected NAME=DIR with DIR a router bundle"
            )
        sessions[name] = RouterSession(Path(folder), session_config=SessionConfig(intra_op_threads=1))
        also.append(name)
    import onnx

    for name, s in sessions.items():
        graph = onnx.load(str(s.bundle_dir / "router.onnx")).graph
        params = sum(int(np.prod(t.dims)) for t in graph.initializer)
        print(f"{name:<10} {s.routing.get('method')}: {params / 1e6:.1f}M parameters, max_length {s.max_length}, "
              f"{len(s.metrics)} scores, providers {s.providers}")  # fmt: skip
    for p in prompts[: args.warmup]:
        for s in sessions.values():
            s.predict_one(p)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for i, p in enumerate(tqdm(prompts[args.warmup :], desc="decisions", unit="prompt")):
        for name in order[i % len(order) :] + order[: i % len(order)]:  # rotate: each goes first in turn
            t0 = time.perf_counter()
            sessions[name].predict_one(p)
            times[name].append(time.perf_counter() - t0)

    ms = {name: [t * 1e3 for t in ts] for name, ts in times.items()}
    print(f"\nrouter decision latency, batch 1, {args.n} PartiPrompts, ONNX Runtime CPU, intra-op threads "
          f"{args.threads or 'default'} (ms; routet2i@Nt: the router at N threads):")  # fmt: skip
    for name, values in ms.items():
        print(
            f"  {name:<10} p50 {_pct(values, 50):8.2f}   p99 {_pct(values, 99):8.2f}   mean {statistics.fmean(values):8.2f}"
        )
    ours = [name for name in sessions if name.startswith("routet2i")]
    for name in ours:
        r50 = _pct(ms["bert-base"], 50) / _pct(ms[name], 50)
        r99 = _pct(ms["bert-base"], 99) / _pct(ms[name], 99)
        print(f"  ratio bert-base / {name}: p50 {r50:.1f}x, p99 {r99:.1f}x (goal >= 5x)")
    ms["routet2i"] = ms[ours[0]]
    base = next((n for n in ours if n.endswith("@1t")), ours[0])
    for name in also:
        r50 = _pct(ms[name], 50) / _pct(ms[base], 50)
        r99 = _pct(ms[name], 99) / _pct(ms[base], 99)
        print(f"  ratio {name} / {base}: p50 {r50:.2f}x, p99 {r99:.2f}x")

    edge_json = CACHE / "bench_edge.json"
    if edge_json.is_file():
        edge = json.loads(edge_json.read_text())
        gen_s = EDGE_STEPS * float(edge["onnx_step_s"])
        share = _pct(ms["routet2i"], 50) / 1e3 / gen_s * 100
        print(f"  one edge generation >= {EDGE_STEPS} x {edge['onnx_step_s']:.2f}s = {gen_s:.1f}s "
              f"({edge.get('device', 'this CPU')}, {edge.get('size', 512)}px, from bench_edge.py): "
              f"router p50 = {share:.4f}% of it (goal < 1%)")  # fmt: skip
    else:
        print(f"  (no {edge_json}: run bench/bench_edge.py for the share of one edge generation)")


if __name__ == "__main__":
    main()
