"""What the numpy schedulers share: diffusers' beta schedules (float32 arithmetic reproduced bit for bit),
sigma -> timestep interpolation, and reading a scheduler's config dataclass from a diffusers config dict.
numpy only."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

F32 = np.float32
C = TypeVar("C")


def config_from_dict(cls: type[C], config: Mapping[str, Any], scheduler: str) -> C:
    """Build the config dataclass ``cls`` from a diffusers config dict: known keys are used, the others
    (except ``_``-prefixed metadata) are kept in the ``ignored`` field, as diffusers ignores them."""
    names = {f.name for f in dataclasses.fields(cls)} - {"ignored"}  # type: ignore[arg-type]
    known = {k: v for k, v in config.items() if k in names}
    ignored = {k: v for k, v in config.items() if k not in names and not k.startswith("_")}
    if ignored:
        logger.debug("%s ignores config keys %s", scheduler, sorted(ignored))
    return cls(**known, ignored=ignored)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit: a float32 step, the first
    half counted up from ``start`` and the second half down from ``end``, each with one rounding."""
    f_start, f_end = F32(start), F32(end)
    if steps == 1:
        return np.array([f_start], dtype=F32)
    step = np.float64((f_end - f_start) / F32(steps - 1))
    idx = np.arange(steps)
    up = np.float64(f_start) + step * idx
    down = np.float64(f_end) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, up, down).astype(F32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The cosine ("squaredcos_cap_v2") schedule."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(
            1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps),
            max_beta,
        )
        for i in range(num_diffusion_timesteps)
    ]
    return np.array(betas, dtype=F32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas_bar_sqrt = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(F32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(F32)


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str,
    beta_start: float,
    beta_end: float,
    trained_betas: list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """The betas of a diffusers scheduler config (linear, scaled_linear, squaredcos_cap_v2 or explicit)."""
    n = num_train_timesteps
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=F32)
    elif beta_schedule == "linear":
        betas = torch_linspace_f32(beta_start, beta_end, n)
    elif beta_schedule == "scaled_linear":
        betas = torch_linspace_f32(beta_start**0.5, beta_end**0.5, n) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(n)
    else:
        raise ValueError(
            f"beta_schedule={beta_schedule!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2"
        )
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def noise_schedule(config: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(betas, alphas, alphas_cumprod) of a scheduler config dataclass, float32 as diffusers computes them."""
    betas = make_betas(
        config.num_train_timesteps,
        config.beta_schedule,
        config.beta_start,
        config.beta_end,
        config.trained_betas,
        getattr(config, "rescale_betas_zero_snr", False),
    )
    alphas = (1.0 - betas).astype(F32)
    # torch.cumprod accumulates float32 in double on CPU: same here, bit for bit.
    alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(F32)
    return betas, alphas, alphas_cumprod


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))
