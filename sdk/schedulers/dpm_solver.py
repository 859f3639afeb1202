"""DPM-Solver++ multistep (Lu et al. 2022) in numpy: a port of diffusers' ``DPMSolverMultistepScheduler``
(deterministic variants: ``dpmsolver++`` and ``dpmsolver``, orders 1-3, midpoint/heun, optional Karras
sigmas) that reads the same ``scheduler_config.json`` and steps to the same numbers (float32 arithmetic in
diffusers' order; parity tested against diffusers step by step). Self-contained: numpy only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from routet2i.schedulers._common import F32, config_from_dict, noise_schedule, sigma_to_t

logger = logging.getLogger(__name__)


@dataclass
class DPMSolverMultistepConfig:
    """The fields of diffusers' ``DPMSolverMultistepScheduler`` config, with diffusers' defaults."""

    num_train_timesteps: int = 1000  # diffusion steps the model was trained with
    beta_start: float = 0.0001  # first beta of the schedule
    beta_end: float = 0.02  # last beta of the schedule
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" (SD) | "squaredcos_cap_v2"
    trained_betas: list[float] | None = None  # explicit betas, overrides the schedule
    solver_order: int = 2  # 1, 2 or 3 (2 for guided sampling)
    prediction_type: str = "epsilon"  # "epsilon" | "v_prediction" | "sample"
    thresholding: bool = False  # dynamic thresholding of x0 (pixel-space models only)
    dynamic_thresholding_ratio: float = 0.995  # percentile for dynamic thresholding
    sample_max_value: float = 1.0  # upper bound of the dynamic threshold
    algorithm_type: str = "dpmsolver++"  # "dpmsolver++" | "dpmsolver" (SDE variants refused)
    solver_type: str = "midpoint"  # second-order solver: "midpoint" | "heun"
    lower_order_final: bool = True  # lower-order final steps when fewer than 15 steps
    euler_at_final: bool = False  # first-order final step
    use_karras_sigmas: bool = False  # Karras et al. sigma spacing (rho = 7)
    use_exponential_sigmas: bool = False  # not supported here (refused)
    use_beta_sigmas: bool = False  # not supported here (refused)
    use_lu_lambdas: bool = False  # not supported here (refused)
    use_flow_sigmas: bool = False  # not supported here (refused)
    flow_shift: float = 1.0  # flow models only (unused)
    final_sigmas_type: str = "zero"  # last sigma: "zero" | "sigma_min"
    lambda_min_clipped: float = -float("inf")  # clip lambda(t) for numerical stability (cosine schedules)
    variance_type: str | None = None  # "learned" | "learned_range": model output has extra channels
    timestep_spacing: str = "linspace"  # "linspace" | "leading" | "trailing"
    steps_offset: int = 0  # added to "leading" timesteps
    rescale_betas_zero_snr: bool = False  # rescale betas to zero terminal SNR
    sigma_min: float | None = None  # lower bound for Karras sigmas (default: the schedule's)
    sigma_max: float | None = None  # upper bound for Karras sigmas (default: the schedule's)
    ignored: dict[str, Any] = field(default_factory=dict)  # config keys this scheduler does not use

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DPMSolverMultistepConfig:
        return config_from_dict(cls, config, "DPMSolverMultistepScheduler")


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(alpha_t, sigma_t) of the VP process from the VE sigma."""
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lam(alpha: np.float32, sigma: np.float32) -> np.float32:
    with np.errstate(divide="ignore"):  # sigma == 0 at the last step: lambda = +inf, as in torch
        return np.log(alpha) - np.log(sigma)


class DPMSolverMultistepScheduler:
    """numpy ``DPMSolverMultistepScheduler``. Use: ``set_timesteps(n)``; for ``t`` in ``timesteps``:
    ``x = step(model(scale_model_input(x, t), t), t, x)``. Keeps the last ``solver_order`` model outputs."""

    order = 1

    def __init__(self, config: DPMSolverMultistepConfig | None = None) -> None:
        self.config = cfg = config or DPMSolverMultistepConfig()
        unsupported = [
            k
            for k in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
            if getattr(cfg, k)
        ]
        if unsupported:
            raise ValueError(
                f"{', '.join(unsupported)} not supported by the numpy DPM-Solver; "
                "supported: default sigmas or use_karras_sigmas"
            )
        if cfg.algorithm_type == "deis":
            cfg.algorithm_type = "dpmsolver++"  # diffusers does the same
        if cfg.algorithm_type not in ("dpmsolver++", "dpmsolver"):
            raise ValueError(
                f"algorithm_type={cfg.algorithm_type!r} is not supported; use dpmsolver++ or dpmsolver "
                "(the SDE variants are not ported)"
            )
        if cfg.solver_type in ("logrho", "bh1", "bh2"):
            cfg.solver_type = "midpoint"  # diffusers does the same
        if cfg.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type={cfg.solver_type!r} is not supported; use midpoint or heun")
        if cfg.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order={cfg.solver_order} must be 1, 2 or 3")
        if cfg.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(
                f"prediction_type={cfg.prediction_type!r} is not supported; use epsilon, v_prediction or sample"
            )
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise ValueError(
                f"timestep_spacing={cfg.timestep_spacing!r} is not supported; use linspace, leading or trailing"
            )
        if cfg.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type={cfg.final_sigmas_type!r} must be 'zero' or 'sigma_min'")
        if cfg.algorithm_type == "dpmsolver" and cfg.final_sigmas_type == "zero":
            raise ValueError("final_sigmas_type='zero' needs algorithm_type dpmsolver++; use 'sigma_min'")
        self.betas, self.alphas, self.alphas_cumprod = noise_schedule(cfg)
        if cfg.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
        self.alpha_t = np.sqrt(self.alphas_cumprod)
        self.sigma_t = np.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = np.log(self.alpha_t) - np.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = np.linspace(0, cfg.num_train_timesteps - 1, cfg.num_train_timesteps, dtype=F32)[
            ::-1
        ].copy()
        self.model_outputs: list[np.ndarray | None] = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DPMSolverMultistepScheduler:
        """Build from a diffusers scheduler config dict (unknown keys are ignored, as diffusers does)."""
        return cls(DPMSolverMultistepConfig.from_dict(config))

    @property
    def step_index(self) -> int | None:
        return self._step_index

    def set_timesteps(self, num_inference_steps: int) -> None:
        cfg = self.config
        n_train = cfg.num_train_timesteps
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, {n_train}]")
        clipped_idx = int(np.searchsorted(self.lambda_t[::-1], cfg.lambda_min_clipped))
        last_timestep = n_train - clipped_idx
        if cfg.timestep_spacing == "linspace":
            ts = (
                np.linspace(0, last_timestep - 1, num_inference_steps + 1)
                .round()[::-1][:-1]
                .copy()
                .astype(np.int64)
            )
        elif cfg.timestep_spacing == "leading":
            ratio = last_timestep // (num_inference_steps + 1)
            ts = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            ts += cfg.steps_offset
        else:  # trailing
            ratio = n_train / num_inference_steps
            ts = np.arange(last_timestep, 0, -ratio).round().copy().astype(np.int64)
            ts -= 1
        sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        log_sigmas = np.log(sigmas)
        if cfg.use_karras_sigmas:
            sigmas = self._convert_to_karras(np.flip(sigmas).copy(), num_inference_steps)
            ts = np.array([sigma_to_t(s, log_sigmas) for s in sigmas])
            if cfg.beta_schedule != "squaredcos_cap_v2":
                ts = ts.round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        if cfg.final_sigmas_type == "sigma_min":
            sigma_last = ((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5
        else:
            sigma_last = 0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(F32)
        self.timesteps = ts.astype(np.int64)
        self.num_inference_steps = len(ts)
        self.model_outputs = [None] * cfg.solver_order
        self.lower_order_nums = 0
        self._step_index = None

    def _convert_to_karras(self, in_sigmas: np.ndarray, num_inference_steps: int) -> np.ndarray:
        sigma_min = self.config.sigma_min if self.config.sigma_min is not None else float(in_sigmas[-1])
        sigma_max = self.config.sigma_max if self.config.sigma_max is not None else float(in_sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, num_inference_steps)
        min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    def _threshold_sample(self, sample: np.ndarray) -> np.ndarray:
        b, c, *rest = sample.shape
        flat = sample.reshape(b, c * int(np.prod(rest))).astype(F32)
        s = np.quantile(np.abs(flat), self.config.dynamic_thresholding_ratio, axis=1).astype(F32)
        s = np.clip(s, 1, self.config.sample_max_value)[:, None]
        return (np.clip(flat, -s, s) / s).reshape(sample.shape).astype(sample.dtype)

    def scale_model_input(self, sample: np.ndarray, timestep: int | None = None) -> np.ndarray:
        return sample

    def _init_step_index(self, timestep: int) -> None:
        candidates = np.nonzero(self.timesteps == timestep)[0]
        if len(candidates) == 0:
            self._step_index = len(self.timesteps) - 1
        elif len(candidates) > 1:
            self._step_index = int(candidates[1])
        else:
            self._step_index = int(candidates[0])

    def convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The model output as the solver's quantity: x0 for dpmsolver++, epsilon for dpmsolver."""
        cfg = self.config
        sigma = self.sigmas[self._step_index]
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
            model_output = model_output[:, :3]
        if cfg.algorithm_type == "dpmsolver++":
            if cfg.prediction_type == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif cfg.prediction_type == "sample":
                x0_pred = model_output
            else:  # v_prediction
                x0_pred = alpha_t * sample - sigma_t * model_output
            if cfg.thresholding:
                x0_pred = self._threshold_sample(x0_pred)
            return x0_pred
        # dpmsolver: epsilon
        if cfg.prediction_type == "epsilon":
            epsilon = model_output
        elif cfg.prediction_type == "sample":
            epsilon = (sample - alpha_t * model_output) / sigma_t
        else:
            epsilon = alpha_t * model_output + sigma_t * sample
        if cfg.thresholding:
            x0_pred = self._threshold_sample((sample - sigma_t * epsilon) / alpha_t)
            epsilon = (sample - alpha_t * x0_pred) / sigma_t
        return epsilon

    def _first_order(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s, sigma_s = _alpha_sigma(self.sigmas[i])
        h = _lam(alpha_t, sigma_t) - _lam(alpha_s, sigma_s)
        if self.config.algorithm_type == "dpmsolver++":
            return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * model_output
        return (alpha_t / alpha_s) * sample - (sigma_t * (np.exp(h) - 1.0)) * model_output

    def _second_order(self, outputs: list[np.ndarray], sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[i - 1])
        lambda_t, lambda_s0, lambda_s1 = (
            _lam(alpha_t, sigma_t),
            _lam(alpha_s0, sigma_s0),
            _lam(alpha_s1, sigma_s1),
        )
        m0, m1 = outputs[-1], outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        if self.config.algorithm_type == "dpmsolver++":
            if self.config.solver_type == "midpoint":
                return (
                    (sigma_t / sigma_s0) * sample
                    - (alpha_t * (np.exp(-h) - 1.0)) * d0
                    - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
                )
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * d0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
            )
        if self.config.solver_type == "midpoint":
            return (
                (alpha_t / alpha_s0) * sample
                - (sigma_t * (np.exp(h) - 1.0)) * d0
                - 0.5 * (sigma_t * (np.exp(h) - 1.0)) * d1
            )
        return (
            (alpha_t / alpha_s0) * sample
            - (sigma_t * (np.exp(h) - 1.0)) * d0
            - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * d1
        )

    def _third_order(self, outputs: list[np.ndarray], sample: np.ndarray) -> np.ndarray:
        i = self._step_index
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[i + 1])
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[i])
        alpha_s1, sigma_s1 = _alpha_sigma(self.sigmas[i - 1])
        alpha_s2, sigma_s2 = _alpha_sigma(self.sigmas[i - 2])
        lambda_t, lambda_s0 = _lam(alpha_t, sigma_t), _lam(alpha_s0, sigma_s0)
        lambda_s1, lambda_s2 = _lam(alpha_s1, sigma_s1), _lam(alpha_s2, sigma_s2)
        m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
        h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
        r0, r1 = h_0 / h, h_1 / h
        d0 = m0
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if self.config.algorithm_type == "dpmsolver++":
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * d0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
            )
        return (
            (alpha_t / alpha_s0) * sample
            - (sigma_t * (np.exp(h) - 1.0)) * d0
            - (sigma_t * ((np.exp(h) - 1.0) / h - 1.0)) * d1
            - (sigma_t * ((np.exp(h) - 1.0 - h) / h**2 - 0.5)) * d2
        )

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray) -> np.ndarray:
        """One multistep DPM-Solver step: returns x_{t-1}."""
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
        cfg = self.config
        if self._step_index is None:
            self._init_step_index(int(timestep))
        n = len(self.timesteps)
        lower_order_final = (self._step_index == n - 1) and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        lower_order_second = (self._step_index == n - 2) and cfg.lower_order_final and n < 15
        converted = self.convert_model_output(model_output, sample)
        for j in range(cfg.solver_order - 1):
            self.model_outputs[j] = self.model_outputs[j + 1]
        self.model_outputs[-1] = converted
        sample = sample.astype(F32, copy=False)
        with np.errstate(over="ignore", invalid="ignore"):
            if cfg.solver_order == 1 or self.lower_order_nums < 1 or lower_order_final:
                prev_sample = self._first_order(converted, sample)
            elif cfg.solver_order == 2 or self.lower_order_nums < 2 or lower_order_second:
                prev_sample = self._second_order(self.model_outputs, sample)  # type: ignore[arg-type]
            else:
                prev_sample = self._third_order(self.model_outputs, sample)  # type: ignore[arg-type]
        if self.lower_order_nums < cfg.solver_order:
            self.lower_order_nums += 1
        self._step_index += 1
        return prev_sample.astype(model_output.dtype, copy=False)
