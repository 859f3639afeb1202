"""DDIM (Song et al. 2020) in numpy: a port of diffusers' ``DDIMScheduler`` that reads the same
``scheduler_config.json`` and steps to the same numbers (float32 arithmetic in diffusers' order; parity
tested against diffusers step by step). Self-contained: numpy only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_F32 = np.float32


@dataclass
class DDIMConfig:
    """The fields of diffusers' ``DDIMScheduler`` config, with diffusers' defaults."""

    num_train_timesteps: int = 1000  # diffusion steps the model was trained with
    beta_start: float = 0.0001  # first beta of the schedule
    beta_end: float = 0.02  # last beta of the schedule
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2"
    trained_betas: list[float] | None = None  # explicit betas, overrides the schedule
    clip_sample: bool = True  # clip predicted x0 to +-clip_sample_range (SD configs set False)
    set_alpha_to_one: bool = True  # alpha_prod before step 0 is 1 (else alphas_cumprod[0])
    steps_offset: int = 0  # added to "leading" timesteps (SD uses 1)
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" (SD2.1 768) | "sample"
    thresholding: bool = False  # dynamic thresholding of x0 (pixel-space models only)
    dynamic_thresholding_ratio: float = 0.995  # percentile for dynamic thresholding
    clip_sample_range: float = 1.0  # bound for clip_sample
    sample_max_value: float = 1.0  # upper bound of the dynamic threshold
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR
    ignored: dict[str, Any] = field(default_factory=dict)  # config keys this scheduler does not use

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DDIMConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"ignored"}
        known = {k: v for k, v in config.items() if k in names}
        ignored = {k: v for k, v in config.items() if k not in names and not k.startswith("_")}
        if ignored:
            logger.debug("DDIMScheduler ignores config keys %s", sorted(ignored))
        return cls(**known, ignored=ignored)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` bit for bit: a float32 step, the first
    half counted up from ``start`` and the second half down from ``end``, each with one rounding."""
    f_start, f_end = _F32(start), _F32(end)
    if steps == 1:
        return np.array([f_start], dtype=_F32)
    step = np.float64((f_end - f_start) / _F32(steps - 1))
    idx = np.arange(steps)
    up = np.float64(f_start) + step * idx
    down = np.float64(f_end) - step * (steps - 1 - idx)
    return np.where(idx < steps // 2, up, down).astype(_F32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
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
    return np.array(betas, dtype=_F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    alphas_bar_sqrt = np.sqrt(np.cumprod((1.0 - betas).astype(np.float64)).astype(_F32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(_F32)


def _make_betas(cfg: DDIMConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = np.asarray(cfg.trained_betas, dtype=_F32)
    elif cfg.beta_schedule == "linear":
        betas = _torch_linspace_f32(cfg.beta_start, cfg.beta_end, n)
    elif cfg.beta_schedule == "scaled_linear":
        betas = _torch_linspace_f32(cfg.beta_start**0.5, cfg.beta_end**0.5, n) ** 2
    elif cfg.beta_schedule == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n)
    else:
        raise ValueError(
            f"beta_schedule={cfg.beta_schedule!r} is not supported; use linear, scaled_linear or squaredcos_cap_v2"
        )
    if cfg.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


class DDIMScheduler:
    """numpy ``DDIMScheduler``. Use: ``set_timesteps(n)``; for ``t`` in ``timesteps``:
    ``x = step(model(scale_model_input(x, t), t), t, x)``."""

    order = 1

    def __init__(self, config: DDIMConfig | None = None) -> None:
        self.config = config or DDIMConfig()
        if self.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type={self.config.prediction_type!r} is not supported; "
                "use epsilon, v_prediction or sample"
            )
        if self.config.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing={self.config.timestep_spacing!r} is not supported; "
                "use leading, trailing or linspace"
            )
        self.betas = _make_betas(self.config)
        self.alphas = (1.0 - self.betas).astype(_F32)
        # torch.cumprod accumulates float32 in double on CPU: same here, bit for bit.
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(_F32)
        self.final_alpha_cumprod = _F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(0, self.config.num_train_timesteps)[::-1].copy().astype(np.int64)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DDIMScheduler:
        """Build from a diffusers scheduler config dict (unknown keys are ignored, as diffusers does)."""
        return cls(DDIMConfig.from_dict(config))

    def scale_model_input(self, sample: np.ndarray, timestep: int | None = None) -> np.ndarray:
        return sample

    def set_timesteps(self, num_inference_steps: int) -> None:
        n_train = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {n_train}]")
        self.num_inference_steps = num_inference_steps
        spacing = self.config.timestep_spacing
        if spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = n_train // num_inference_steps
            ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(np.int64)
            ts += self.config.steps_offset
        else:  # trailing
            ratio = n_train / num_inference_steps
            ts = np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1
        self.timesteps = ts

    def _variance(self, timestep: int, prev_timestep: int) -> np.float32:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        return (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def _threshold_sample(self, sample: np.ndarray) -> np.ndarray:
        b, c, *rest = sample.shape
        flat = sample.reshape(b, c * int(np.prod(rest))).astype(_F32)
        s = np.quantile(np.abs(flat), self.config.dynamic_thresholding_ratio, axis=1).astype(_F32)
        s = np.clip(s, 1, self.config.sample_max_value)[:, None]
        return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(sample.dtype)

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        eta: float = 0.0,
        variance_noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """One DDIM step: returns x_{t-1}. ``eta > 0`` needs ``variance_noise`` (standard normal, the
        sample's shape)."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        cfg = self.config
        timestep = int(timestep)
        prev_timestep = timestep - cfg.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t

        if cfg.prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
            pred_epsilon = model_output
        elif cfg.prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
        else:  # v_prediction
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
            pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample

        if cfg.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif cfg.clip_sample:
            r = cfg.clip_sample_range
            pred_original_sample = np.clip(pred_original_sample, -r, r)

        variance = self._variance(timestep, prev_timestep)
        std_dev_t = _F32(eta) * variance ** (0.5)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is None:
                raise ValueError(
                    "eta > 0 needs variance_noise (a standard normal array of the sample's shape)"
                )
            prev_sample = prev_sample + std_dev_t * variance_noise
        return prev_sample.astype(model_output.dtype, copy=False)
