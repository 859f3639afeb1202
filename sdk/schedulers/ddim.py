"""DDIM (Song et al. 2020) in numpy: a port of diffusers' ``DDIMScheduler`` that reads the same
``scheduler_config.json`` and steps to the same numbers (float32 arithmetic in diffusers' order; parity
tested against diffusers step by step). Self-contained: numpy only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from routet2i.schedulers._common import F32, config_from_dict, noise_schedule

logger = logging.getLogger(__name__)


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
        return config_from_dict(cls, config, "DDIMScheduler")


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
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(self.config)
        self.final_alpha_cumprod = F32(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
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
        flat = sample.reshape(b, c * int(np.prod(rest))).astype(F32)
        s = np.quantile(np.abs(flat), self.config.dynamic_thresholding_ratio, axis=1).astype(F32)
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
        std_dev_t = F32(eta) * variance ** (0.5)
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
        prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is None:
                raise ValueError(
                    "eta > 0 needs variance_noise (a standard normal array of the sample's shape)"
                )
            prev_sample = prev_sample + std_dev_t * variance_noise
        return prev_sample.astype(model_output.dtype, copy=False)
