"""Euler (Karras et al. 2022, Algorithm 2, deterministic) in numpy: a port of diffusers'
``EulerDiscreteScheduler`` that reads the same ``scheduler_config.json`` and steps to the same numbers
(float32 arithmetic in diffusers' order; parity tested against diffusers step by step). Self-contained.
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
        names = {f.name for f in dataclasses.fields(cls)} - {"ignored"}
        known = {k: v for k, v in config.items() if k in names}
        ignored = {k: v for k, v in config.items() if k not in names and not k.startswith("_")}
        if ignored:
            logger.debug("EulerDiscreteScheduler ignores config keys %s", sorted(ignored))
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


def _make_betas(cfg: EulerDiscreteConfig) -> np.ndarray:
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


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


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
        self.betas = _make_betas(cfg)
        self.alphas = (1.0 - self.betas).astype(_F32)
        # torch.cumprod accumulates float32 in double on CPU: same here, bit for bit.
        self.alphas_cumprod = np.cumprod(self.alphas.astype(np.float64)).astype(_F32)
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)[::-1].copy()
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=_F32)])
        self.timesteps = np.linspace(0, cfg.num_train_timesteps - 1, cfg.num_train_timesteps)[::-1].astype(
            _F32
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
            ts = np.linspace(0, n_train - 1, num_inference_steps, dtype=_F32)[::-1].copy()
        elif cfg.timestep_spacing == "leading":
            ratio = n_train // num_inference_steps
            ts = (np.arange(0, num_inference_steps) * ratio).round()[::-1].copy().astype(_F32)
            ts += cfg.steps_offset
        else:  # trailing
            ratio = n_train / num_inference_steps
            ts = np.arange(n_train, 0, -ratio).round().copy().astype(_F32)
            ts -= 1
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        log_sigmas = np.log(sigmas)
        if cfg.interpolation_type == "linear":
            sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        else:  # log_linear
            sigmas = np.exp(
                _torch_linspace_f32(np.log(sigmas[-1]), np.log(sigmas[0]), num_inference_steps + 1)
            )
        if cfg.use_karras_sigmas:
            sigmas = self._convert_to_karras(sigmas, num_inference_steps)
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(_F32)
        if cfg.timestep_type == "continuous" and cfg.prediction_type == "v_prediction":
            self.timesteps = np.array([0.25 * np.log(s) for s in self.sigmas[:-1]], dtype=_F32)
        else:
            self.timesteps = ts.astype(_F32)
        self._step_index = None

    def _convert_to_karras(self, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        sigma_min = self.config.sigma_min if self.config.sigma_min is not None else float(in_sigmas[-1])
        sigma_max = self.config.sigma_max if self.config.sigma_max is not None else float(in_sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, num_inference_steps)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def _init_step_index(self, timestep: float) -> None:
        indices = np.nonzero(self.timesteps == _F32(timestep))[0]
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
        sample = sample.astype(_F32, copy=False)
        sigma = self.sigmas[self._step_index]
        sigma_hat = sigma * _F32(1.0)
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
