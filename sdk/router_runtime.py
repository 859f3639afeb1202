"""The on-device router: a router bundle (``routet2i export router``) run with `tokenizers` + ONNX Runtime.

``RouterSession(bundle_dir)`` verifies the bundle's manifest, loads ``tokenizer/tokenizer.json``,
``routing.json`` and ``router.onnx`` (one session, created here and reused), and predicts PRS^ and the
per-metric scores of prompts: ``predict(prompts) -> (prs [B], metric_scores [B, k])``. Prompts longer
than ``routing.json``'s ``max_length`` tokens are truncated with a warning (as the router was trained).
No torch, no transformers.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from routet2i._errors import BundleError, BundleFileMissing, UsageError
from routet2i.bundle import read_json_object, verify_bundle
from routet2i.ort import OrtModel, ProviderSpec, SessionConfig, provider_name, resolve_providers

logger = logging.getLogger(__name__)

__all__ = ["RouterSession", "REQUIRED_ROUTING_KEYS", "router_providers"]

REQUIRED_FILES = ("router.onnx", "routing.json", "tokenizer/tokenizer.json")
# routing.json keys the device relies on (`routet2i export router` writes more: model names, alpha, the
# routing version; README, section Export).
REQUIRED_ROUTING_KEYS = ("metrics", "max_length", "calibration")


def router_providers(providers: str | Sequence[ProviderSpec] | None) -> list[ProviderSpec]:
    """``providers`` resolved as for every session, without TensorRT: the router's input is as long as the
    prompt (no padding), and TensorRT builds an engine per input shape, i.e. one per prompt length. The
    router runs on the next provider of the list (CUDA, else CPU); the edge pipeline keeps TensorRT."""
    chosen = resolve_providers(providers)
    kept = [p for p in chosen if provider_name(p) != "TensorrtExecutionProvider"]
    if len(kept) != len(chosen):
        logger.info("router: TensorRT skipped (an engine per prompt length); using %s", kept)
    return kept or ["CPUExecutionProvider"]


class RouterSession:
    """One router bundle, ready to predict.

    ``check_hashes``: "first" (default: sha256 of a file only when it changed since it last matched, see
    `routet2i.bundle.verify_bundle`), "always" or "never" (sizes only). ``trusted_keys``: Ed25519 public-key
    PEM files; when given, an unsigned or wrongly signed bundle is refused. ``cache_dir``: the hash cache's
    and optimized-graph cache's folder (default `routet2i.paths.user_cache_dir`). ``session_config`` None:
    one intra-op thread (a router decision is a small graph on one short prompt: measured with
    bench/bench_router_latency.py, one thread had the lower p50 and p99 than ONNX Runtime's default pool).

    Attributes: ``routing`` (parsed routing.json), ``metrics`` (the k metric names, in output order),
    ``max_length`` (tokens per prompt), ``providers`` (what ONNX Runtime runs on), ``manifest``.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: str | Sequence[ProviderSpec] | None = None,
        session_config: SessionConfig | None = None,
        check_hashes: bool | str = "first",
        trusted_keys: Sequence[str | os.PathLike[str]] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        from tokenizers import Tokenizer

        t0 = time.perf_counter()
        self.bundle_dir = root = Path(bundle_dir)
        self.check = verify_bundle(
            root, kind="router", check_hashes=check_hashes, trusted_keys=trusted_keys, cache_dir=cache_dir
        )
        self.manifest = self.check.manifest
        for rel in REQUIRED_FILES:
            if not (root / rel).is_file():
                raise BundleFileMissing(f"{root / rel}: required by a router bundle but missing")
        routing = read_json_object(root / "routing.json")
        required = list(REQUIRED_ROUTING_KEYS)
        if (
            isinstance(routing.get("models"), list)
            and sum(isinstance(m, dict) and m.get("where") == "cloud" for m in routing["models"]) >= 2
        ):  # an N-model router: lambda from the budget table instead of alpha from the calibration
            required[required.index("calibration")] = "budget_table"
        missing = [k for k in required if k not in routing]
        if missing:
            raise BundleError(f"{root / 'routing.json'}: missing keys {missing}")
        metrics = routing["metrics"]
        if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
            raise BundleError(f"{root / 'routing.json'}: 'metrics' must be a non-empty list of names")
        max_length = routing["max_length"]
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise BundleError(
                f"{root / 'routing.json'}: 'max_length' must be an integer >= 2, got {max_length!r}"
            )
        self.routing: dict[str, Any] = routing
        self.metrics: list[str] = list(metrics)
        self.max_length: int = max_length
        self.router_version = str(routing.get("router_version", ""))

        try:
            self.tokenizer = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses for bad files
            raise BundleError(f"{root / 'tokenizer/tokenizer.json'}: cannot be loaded ({exc})") from None
        self._pad_id = self._pad_token_id(root / "tokenizer")
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_length)

        self.model = OrtModel(
            root / "router.onnx",
            router_providers(providers),
            session_config or SessionConfig(intra_op_threads=1),
            cache_dir=cache_dir,
            cache_key=f"{self.check.manifest_sha256}:router.onnx",
        )
        if set(self.model.input_types) != {"input_ids", "attention_mask"}:
            raise BundleError(
                f"{root / 'router.onnx'}: inputs {sorted(self.model.input_types)}, expected input_ids, attention_mask"
            )
        if not {"prs", "metric_scores"} <= set(self.model.output_names):
            raise BundleError(
                f"{root / 'router.onnx'}: outputs {self.model.output_names}, expected prs and metric_scores"
            )
        # the models it routes to (routing.json ``models``; older bundles: the edge/cloud pair); an N-model
        # router (two or more cloud models) also outputs model_scores [batch, n_models]
        from routet2i.policy import routing_models

        try:
            self.models = routing_models(routing)
        except UsageError as exc:
            raise BundleError(f"{root / 'routing.json'}: {exc}") from None
        self.model_names = [m.name for m in self.models]
        self.nmodel = sum(m.where == "cloud" for m in self.models) >= 2
        if self.nmodel and "model_scores" not in self.model.output_names:
            raise BundleError(
                f"{root / 'router.onnx'}: outputs {self.model.output_names}; routing.json lists "
                f"{len(self.models)} models, so model_scores [batch, {len(self.models)}] is expected too"
            )
        self.providers = self.model.providers
        logger.info(
            "RouterSession ready in %.2fs: %s (%s, %d metrics, max_length %d) on %s",
            time.perf_counter() - t0,
            root,
            routing.get("method", "?"),
            len(self.metrics),
            self.max_length,
            self.providers,
        )

    def _pad_token_id(self, folder: Path) -> int:
        padding = self.tokenizer.padding
        if padding and padding.get("pad_id") is not None:
            return int(padding["pad_id"])
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / name
            if path.is_file():
                pad = read_json_object(path).get("pad_token")
                pad = pad.get("content") if isinstance(pad, dict) else pad
                if isinstance(pad, str) and self.tokenizer.token_to_id(pad) is not None:
                    return int(self.tokenizer.token_to_id(pad))
        for token in ("[PAD]", "<pad>"):
            if self.tokenizer.token_to_id(token) is not None:
                return int(self.tokenizer.token_to_id(token))
        return 0  # padded positions are masked out by attention_mask

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 [B, longest], truncated to ``max_length`` with a warning."""
        encodings = self.tokenizer.encode_batch(list(prompts))
        length = max(len(e.ids) for e in encodings)
        ids = np.full((len(encodings), length), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for i, enc in enumerate(encodings):
            ids[i, : len(enc.ids)] = enc.ids
            mask[i, : len(enc.ids)] = enc.attention_mask
            if enc.overflowing:
                logger.warning(
                    "prompt %d is longer than the router's max_length of %d tokens: truncated",
                    i,
                    self.max_length,
                )
        return ids, mask

    def predict(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """PRS^ [B] and per-metric scores [B, k] (``self.metrics`` order) for a batch of prompts."""
        prs, scores, _ = self._predict(prompts)
        return prs, scores

    def _predict(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise UsageError(f"prompts={prompts!r}: must be a list of strings (use predict_one for one)")
        if len(prompts) == 0:
            raise UsageError("prompts=[]: give at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise UsageError(f"prompts[{i}]={p!r}: must be a non-empty string")
        ids, mask = self.tokenize(prompts)
        out = self.model(input_ids=ids, attention_mask=mask)
        prs = np.asarray(out["prs"], dtype=np.float32).reshape(len(prompts))
        scores = np.asarray(out["metric_scores"], dtype=np.float32)
        if scores.shape != (len(prompts), len(self.metrics)):
            raise BundleError(
                f"{self.bundle_dir / 'router.onnx'}: metric_scores shape {scores.shape}, "
                f"expected {(len(prompts), len(self.metrics))} (routing.json lists {len(self.metrics)} metrics)"
            )
        return prs, scores, out

    def predict_models(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """`predict` plus model_scores [B, n_models] (``self.model_names`` order) of an N-model router
        (None for a 2-model one)."""
        prs, scores, out = self._predict(prompts)
        if not self.nmodel:
            return prs, scores, None
        ms = np.asarray(out["model_scores"], dtype=np.float32)
        if ms.shape != (len(prompts), len(self.models)):
            raise BundleError(
                f"{self.bundle_dir / 'router.onnx'}: model_scores shape {ms.shape}, expected "
                f"{(len(prompts), len(self.models))} (routing.json lists {len(self.models)} models)"
            )
        return prs, scores, ms

    def predict_models_one(self, prompt: str) -> tuple[float, np.ndarray, np.ndarray | None]:
        """`predict_one` plus the model_scores [n_models] of an N-model router (None for a 2-model one)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"prompt={prompt!r}: must be a non-empty string")
        prs, scores, ms = self.predict_models([prompt])
        return float(prs[0]), scores[0], None if ms is None else ms[0]

    def predict_one(self, prompt: str) -> tuple[float, np.ndarray]:
        """PRS^ and the per-metric scores [k] of one prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"prompt={prompt!r}: must be a non-empty string")
        prs, scores = self.predict([prompt])
        return float(prs[0]), scores[0]
