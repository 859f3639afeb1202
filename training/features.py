"""Frozen backbone token states, computed once per (backbone, max_length, prompt list) and cached.

With a frozen backbone the expensive part of every router is the encoder pass; ``token_states`` runs it once
and every epoch, fold, seed and method reuses the result (in memory within a process, on disk across
processes). The cache key is a hash of the resolved backbone (its path or id plus the bytes of its
config.json), ``max_length`` and the exact prompt texts.

Cache folder: ``$ROUTET2I_CACHE/token_states`` (default ``~/.cache/routet2i/token_states``); pass
``cache_dir=None`` with ``use_disk=False`` to keep it in memory only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from routet2i.training.model import load_backbone, resolve_backbone
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = ["TokenStates", "token_states", "default_cache_dir"]

_MEMORY: dict[str, TokenStates] = {}


@dataclass
class TokenStates:
    """Last-layer token states of a frozen encoder for a list of prompts."""

    states: torch.Tensor  # [N, L, d] float32, padded to the longest prompt of the list (L <= max_length)
    mask: torch.Tensor  # [N, L] int64 attention mask: 1 = real token, 0 = padding
    backbone: str  # the backbone name or folder as given
    max_length: int  # tokenizer truncation length used
    key: str  # cache key (sha256 hex)

    @property
    def hidden_size(self) -> int:
        return int(self.states.shape[-1])

    def subset(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of the rows ``idx``, trimmed to their longest prompt."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        mask = self.mask[idx]
        length = max(int(mask.sum(dim=1).max()), 1) if len(idx) else 1
        return self.states[idx, :length], mask[:, :length]


def default_cache_dir() -> Path:
    root = os.environ.get("ROUTET2I_CACHE") or Path.home() / ".cache" / "routet2i"
    return Path(root) / "token_states"


def _cache_key(backbone: str, max_length: int, prompts: list[str]) -> str:
    h = hashlib.sha256()
    resolved = resolve_backbone(backbone)
    h.update(resolved.encode())
    config = Path(resolved) / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
        for weights in sorted(Path(resolved).glob("*.safetensors")) + sorted(Path(resolved).glob("*.bin")):
            h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    h.update(f"|{max_length}|".encode())
    for p in prompts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


@torch.no_grad()
def token_states(
    prompts: list[str],
    backbone: str = "",
    max_length: int = 128,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    use_disk: bool = True,
) -> TokenStates:
    """Token states of ``prompts`` under the frozen ``backbone`` (cached; see the module docstring)."""
    key = _cache_key(backbone, max_length, prompts)
    if key in _MEMORY:
        return _MEMORY[key]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{key}.pt"
    if use_disk and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        out = TokenStates(blob["states"].float(), blob["mask"], backbone, max_length, key)
        logger.info("token states: %d prompts from cache %s", len(prompts), path)
        _MEMORY[key] = out
        return out
    encoder, tokenizer = load_backbone(backbone)
    enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    chunks = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="token states", leave=False, unit="batch"):
        sl = slice(start, start + batch_size)
        chunks.append(encoder(input_ids=ids[sl], attention_mask=mask[sl]).last_hidden_state.float())
    states = torch.cat(chunks) if chunks else torch.zeros(0, ids.shape[1], encoder.config.hidden_size)
    # Stored as float16 on disk; the same rounding in memory makes a cold and a warm cache train alike.
    states = states.half().float().contiguous()
    out = TokenStates(states, mask.to(torch.int64), backbone, max_length, key)
    if use_disk:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"states": out.states.half(), "mask": out.mask}, tmp)
        tmp.replace(path)
    _MEMORY[key] = out
    return out
