"""Euler (Karras et al. 2022, Algorithm 2, deterministic) in numpy: a port of diffusers'
``EulerDiscreteScheduler`` that reads the same ``scheduler_config.json`` and steps to the same numbers
(float32 arithmetic in diffusers' order; parity tested against diffusers step by step). Self-contained.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from routet2i.schedulers._common import F32, config_from_dict, noise_schedule, sigma_to_t, torch_linspace_f32

logger = logging.getLogger(__name__)


@dataclass
class EulerDiscreteConfig:
    """The fields of diffusers' ``EulerDiscreteScheduler`` config, with diffusers' defaults."""

    num_train_timesteps: int = 1000  # diffusion steps the model was trained with
    beta_start: float = 0.0001  # first beta of the schedule
    beta_end: float = 0.02  # last beta of the schedule
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2"
    trained_betas: list[float] | None = None  # explicit betas, overrides the schedule
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    interpolation_type: str = "linear"  # sigma interpolation: "linear" | "log_linear"
    use_karras_sigmas: bool = False  # Karras et al. sigma spacing (rho = 7)
    use_exponential_sigmas: bool = False  # not supported here (refused)
    use_beta_sigmas: bool = False  # not supported here (needs scipy; refused)
    sigma_min: float | None = None  # lower bound for Karras sigmas (default: the schedule's)
    sigma_max: float | None = None  # upper bound for Karras sigmas (default: the schedule's)
    timestep_spacing: str = "linspace"  # "linspace" | "leading" | "trailing"
    timestep_type: str = "discrete"  # "discrete" | "continuous" (v-prediction EDM-style models)
    steps_offset: int = 0  # added to "leading" timesteps
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR
    final_sigmas_type: str = "zero"  # last sigma: "zero" | "sigma_min"
    ignored: dict[str, Any] = field(default_factory=dict)  # config keys this scheduler does not use

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> EulerDiscreteConfig:
        return config_from_dict(cls, config, "EulerDiscreteScheduler")


class EulerDiscreteScheduler:
    """numpy ``EulerDiscreteScheduler``. Use: ``set_timesteps(n)``; ``x = randn * init_noise_sigma``;
    for ``t`` in ``timesteps``: ``x = step(model(scale_model_input(x, t), t), t, x)``."""

    order = 1

    def __init__(self, config: EulerDiscreteConfig | None = None) -> None:
        self.config = cfg = config or EulerDiscreteConfig()
        if cfg.use_exponential_sigmas or cfg.use_beta_sigmas:
            raise ValueError(
                "use_exponential_sigmas / use_beta_sigmas are not supported by the numpy Euler scheduler; "
                "supported: default sigmas or use_karras_sigmas"
            )
        if cfg.prediction_type not in ("epsilon", "v_prediction", "sample", "original_sample"):
            raise ValueError(
                f"prediction_type={cfg.prediction_type!r} is not supported; use epsilon, v_prediction or sample"
            )
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing={cfg.timestep_spacing!r} is not supported; use linspace, leading or trailing"
            )
        if cfg.interpolation_type not in ("linear", "log_linear"):
            raise ValueError(
                f"interpolation_type={cfg.interpolation_type!r} is not supported; use linear or log_linear"
            )
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={cfg.final_sigmas_type!r} must be 'zero' or 'sigma_min'")
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(cfg)
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)[::-1].copy()
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=F32)])
        self.timesteps = np.linspace(0, cfg.num_train_timesteps - 1, cfg.num_train_timesteps)[::-1].astype(
            F32
        )
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EulerDiscreteScheduler:
        """Build from a diffusers scheduler config dict (unknown keys are ignored, as diffusers does)."""
        return cls(EulerDiscreteConfig.from_dict(config))

    @property
    def init_noise_sigma(self) -> float:
        max_sigma = self.sigmas.max()
        if self.config.timestep_spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n_train = cfg.num_train_timesteps
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {n_train}]")
        self.num_inference_steps = num_inference_steps
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_inference_steps, dtype=F32)[::-1].copy()
        elif cfg.timestep_spacing == "leading":
            ratio = n_train // num_inference_steps
            ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(F32)
            ts += cfg.steps_offset
        else:  # trailing
            ratio = n_train / num_inference_steps
            ts = np.arange(n_train, 0, -ratio).round().copy().astype(F32)
            ts -= 1
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        log_sigmas = np.log(sigmas)
        if cfg.interpolation_type == "linear":
            sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        else:  # log_linear
            sigmas = np.exp(
                torch_linspace_f32(np.log(sigmas[-1]), np.log(sigmas[0]), num_inference_steps + 1)
            )
        if cfg.use_karras_sigmas:
            sigmas = self._convert_to_karras(sigmas, num_inference_steps)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            self.timesteps = np.array([0.25 * np.log(s) for s in self.sigmas[:-1]], dtype=F32)
        else:
            self.timesteps = ts.astype(F32)
        self._step_index = None

    def _convert_to_karras(self, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        sigma_min = self.config.sigma_min if self.config.sigma_min is not None else float(in_sigmas[-1])
        sigma_max = self.config.sigma_max if self.config.sigma_max is not None else float(in_sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, num_inference_steps)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def _init_step_index(self, timestep: float) -> None:
        indices = np.nonzero(self.timesteps == F32(timestep))[0]
        if len(indices) == 0:
            raise ValueError(f"timestep={timestep} is not one of this scheduler's timesteps")
        # The second match when a timestep repeats (diffusers does the same for img2img starts).
        self._step_index = int(indices[1] if len(indices) > 1 else indices[0])

    def scale_model_input(self, sample: np.ndarray, timestep: float) -> np.ndarray:
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: np.ndarray, timestep: float, sample: np.ndarray) -> np.ndarray:
        """One Euler step (no churn): returns x_{t-1}."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        if self._step_index is None:
            self._init_step_index(timestep)
        sample = sample.astype(F32, copy=False)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma * F32(1.0)
        pt = self.config.prediction_type
        if pt in ("original_sample", "sample"):
            pred_original_sample = model_output
        elif pt == "epsilon":
            pred_original_sample = sample - sigma_hat * model_output
        else:  # v_prediction
            pred_original_sample = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[self._step_index + 1] - sigma_hat
        prev_sample = sample + derivative * dt
        self._step_index += 1
        return prev_sample.astype(model_output.dtype, copy=False)
