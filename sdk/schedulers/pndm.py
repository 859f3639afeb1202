"""PNDM / PLMS (Liu et al. 2022) in numpy: a port of diffusers' ``PNDMScheduler`` (the scheduler
stabilityai/stable-diffusion-2-1-base ships, with ``skip_prk_steps``: PLMS) that reads the same
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
class PNDMConfig:
    """The fields of diffusers' ``PNDMScheduler`` config, with diffusers' defaults."""

    num_train_timesteps: int = 1000  # diffusion steps the model was trained with
    beta_start: float = 0.0001  # first beta of the schedule
    beta_end: float = 0.02  # last beta of the schedule
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2"
    trained_betas: list[float] | None = None  # explicit betas, overrides the schedule
    skip_prk_steps: bool = False  # True: PLMS only (what SD configs set); False: Runge-Kutta warm-up first
    set_alpha_to_one: bool = False  # alpha_prod before step 0 is 1 (else alphas_cumprod[0])
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction"
    timestep_spacing: str = "leading"  # "leading" | "trailing" | "linspace"
    steps_offset: int = 0  # added to "leading" timesteps (SD uses 1)
    ignored: dict[str, Any] = field(default_factory=dict)  # config keys this scheduler does not use

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PNDMConfig:
        return config_from_dict(cls, config, "PNDMScheduler")


class PNDMScheduler:
    """numpy ``PNDMScheduler``. Use: ``set_timesteps(n)``; for ``t`` in ``timesteps``:
    ``x = step(model(scale_model_input(x, t), t), t, x)``. Keeps the last model outputs (``ets``); with
    ``skip_prk_steps=False`` the first 12 entries of ``timesteps`` are Runge-Kutta sub-steps."""

    order = 1
    pndm_order = 4

    def __init__(self, config: PNDMConfig | None = None) -> None:
        self.config = cfg = config or PNDMConfig()
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type={cfg.prediction_type!r} is not supported; use epsilon or v_prediction"
            )
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing={cfg.timestep_spacing!r} is not supported; use leading, trailing or linspace"
            )
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(cfg)
        self.final_alpha_cumprod = F32(1.0) if cfg.set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(0, cfg.num_train_timesteps)[::-1].copy().astype(np.int64)
        self._reset()

    def _reset(self) -> None:
        self.cur_model_output: Any = 0
        self.counter = 0
        self.cur_sample: np.ndarray | None = None
        self.ets: list[np.ndarray] = []

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PNDMScheduler:
        """Build from a diffusers scheduler config dict (unknown keys are ignored, as diffusers does)."""
        return cls(PNDMConfig.from_dict(config))

    def scale_model_input(self, sample: np.ndarray, timestep: int | None = None) -> np.ndarray:
        return sample

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n_train = cfg.num_train_timesteps
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {n_train}]")
        if not cfg.skip_prk_steps and num_inference_steps < self.pndm_order:
            raise ValueError(
                f"num_inference_steps={num_inference_steps}: PNDM with Runge-Kutta steps needs at least "
                f"{self.pndm_order} (or skip_prk_steps=True)"
            )
        self.num_inference_steps = num_inference_steps
        if cfg.timestep_spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_inference_steps).round().astype(np.int64)
        elif cfg.timestep_spacing == "leading":
            ratio = n_train // num_inference_steps
            ts = (np.arange(0, num_inference_steps) * ratio).round()
            ts += cfg.steps_offset
        else:  # trailing
            ratio = n_train / num_inference_steps
            ts = np.round(np.arange(n_train, 0, -ratio))[::-1].astype(np.int64)
            ts -= 1
        if cfg.skip_prk_steps:
            self.prk_timesteps = np.array([])
            self.plms_timesteps = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()
        else:
            prk = np.array(ts[-self.pndm_order :]).repeat(2) + np.tile(
                np.array([0, n_train // num_inference_steps // 2]), self.pndm_order
            )
            self.prk_timesteps = (prk[:-1].repeat(2)[1:-1])[::-1].copy()
            self.plms_timesteps = ts[:-3][::-1].copy()
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset()

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """One PNDM step (Runge-Kutta while warming up, then linear multistep): returns x_{t-1}."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            out = self._step_prk(model_output, int(timestep), sample)
        else:
            out = self._step_plms(model_output, int(timestep), sample)
        return out.astype(model_output.dtype, copy=False)

    def _step_prk(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        n_train = self.config.num_train_timesteps
        diff_to_prev = 0 if self.counter % 2 else n_train // self.num_inference_steps // 2
        prev_timestep = timestep - diff_to_prev
        timestep = int(self.prk_timesteps[self.counter // 4 * 4])
        if self.counter % 4 == 0:
            self.cur_model_output = self.cur_model_output + 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif (self.counter - 1) % 4 == 0:
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        elif (self.counter - 2) % 4 == 0:
            self.cur_model_output = self.cur_model_output + 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        prev_sample = self._prev_sample(cur_sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _step_plms(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        n_train = self.config.num_train_timesteps
        prev_timestep = timestep - n_train // self.num_inference_steps
        if self.counter != 1:
            self.ets = self.ets[-3:]
            self.ets.append(model_output)
        else:
            prev_timestep = timestep
            timestep = timestep + n_train // self.num_inference_steps
        if len(self.ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(self.ets) == 1 and self.counter == 1:
            model_output = (model_output + self.ets[-1]) / 2
            sample = self.cur_sample
            self.cur_sample = None
        elif len(self.ets) == 2:
            model_output = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            model_output = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            model_output = (1 / 24) * (
                55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4]
            )
        prev_sample = self._prev_sample(sample, timestep, prev_timestep, model_output)
        self.counter += 1
        return prev_sample

    def _prev_sample(
        self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray
    ) -> np.ndarray:
        alpha_prod_t = self.alphas_cumprod[timestep]
        alpha_prod_t_prev = (
            self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        )
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        if self.config.prediction_type == "v_prediction":
            model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
        sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** (0.5)
        denom = alpha_prod_t * beta_prod_t_prev ** (0.5) + (
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        ) ** (0.5)
        return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom
