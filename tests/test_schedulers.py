"""Parity of the numpy schedulers with diffusers' own, step by step (max abs diff <= 1e-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from routet2i.schedulers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    load_scheduler_config,
    scheduler_from_config,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TOL = 1e-5

# stabilityai/stable-diffusion-2-1 scheduler/scheduler_config.json (768, v-prediction); 2-1-base is the
# same schedule with epsilon prediction.
SD21_CONFIG = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

PAIRS = {
    "ddim": (DDIMScheduler, "DDIMScheduler"),
    "euler": (EulerDiscreteScheduler, "EulerDiscreteScheduler"),
    "dpm++": (DPMSolverMultistepScheduler, "DPMSolverMultistepScheduler"),
    "pndm": (PNDMScheduler, "PNDMScheduler"),
}


_X0 = (0.8 * np.random.default_rng(1).standard_normal((2, 4, 16, 16))).astype(np.float32)


def _denoiser(prediction_type: str, alphas_cumprod: np.ndarray):
    """A stand-in for a trained UNet: it predicts the noise (or v) that points from the sample it is given
    to a fixed unit-scale "image" ``_X0`` plus a sample-dependent wiggle, so trajectories stay in the
    range real SD latents do. Euler feeds scaled inputs and fractional timesteps: both are handled as the
    VP model input they are."""

    def model(x: np.ndarray, t: float) -> np.ndarray:
        ab = float(np.interp(float(t), np.arange(len(alphas_cumprod)), alphas_cumprod.astype(np.float64)))
        x0 = _X0 + 0.1 * np.sin(x)
        eps = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
        out = eps if prediction_type == "epsilon" else ab**0.5 * eps - (1 - ab) ** 0.5 * x0
        return out.astype(np.float32)

    return model


def _run_both(name: str, config: dict, steps: int, abs_only: bool = True) -> float:
    np_cls, diffusers_name = PAIRS[name]
    ref = getattr(diffusers, diffusers_name).from_config(config)
    ours = np_cls.from_config(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    if ours.timesteps.dtype.kind == "i":
        np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    else:  # Karras timesteps come from float32 log/sqrt: equal to an ulp or so
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=0)
    assert abs(float(ours.init_noise_sigma) - float(ref.init_noise_sigma)) <= TOL * max(
        1.0, float(ref.init_noise_sigma)
    )

    worst = 0.0
    model = _denoiser(config.get("prediction_type", "epsilon"), ref.alphas_cumprod.numpy())
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 4, 16, 16), dtype=np.float32)
    x_ours = x0 * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(x0) * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        t_np = ours.timesteps[i]
        in_ref = ref.scale_model_input(x_ref, t)
        in_ours = ours.scale_model_input(x_ours, t_np)
        assert np.abs(in_ours - in_ref.numpy()).max() <= TOL * max(1.0, float(np.abs(in_ours).max()))
        x_ref = ref.step(torch.from_numpy(model(in_ref.numpy(), float(t))), t, x_ref).prev_sample
        x_ours = ours.step(model(in_ours, float(t_np)), t_np, x_ours)
        assert x_ours.dtype == np.float32
        diff = float(np.abs(x_ours - x_ref.numpy()).max())
        # Absolute 1e-5. With abs_only=False (diffusers' default linear schedule starts at sigma ~157, where
        # float32's own resolution is coarser than 1e-5) the bound grows with the samples' magnitude.
        bound = TOL if abs_only else TOL * max(1.0, float(np.abs(x_ref.numpy()).max()) / 8.0)
        worst = max(worst, diff)
        assert diff <= bound, f"{name} step {i} (t={t}): max abs diff {diff} > {bound}"
    assert np.isfinite(x_ours).all()
    # The loop really moved the sample (a scheduler that returns its input would not pass).
    assert float(np.abs(x_ours - x0 * np.float32(ours.init_noise_sigma)).max()) > 1e-3
    return worst


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_parity_sd21_config(name: str, prediction_type: str, steps: int) -> None:
    """The SD2.1 config as shipped (DDIM, leading spacing, steps_offset 1), swapped to each class as
    ``XScheduler.from_config(pipe.scheduler.config)`` does."""
    _run_both(name, {**SD21_CONFIG, "prediction_type": prediction_type}, steps)


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_timestep_spacing(name: str, spacing: str, prediction_type: str) -> None:
    cfg = {**SD21_CONFIG, "timestep_spacing": spacing, "prediction_type": prediction_type}
    _run_both(name, cfg, 10)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [8, 20])
def test_parity_dpm_orders(order: int, solver_type: str, steps: int) -> None:
    cfg = {**SD21_CONFIG, "solver_order": order, "solver_type": solver_type, "prediction_type": "epsilon"}
    _run_both("dpm++", cfg, steps)


@pytest.mark.parametrize("name", ["euler", "dpm++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_karras_sigmas(name: str, prediction_type: str) -> None:
    cfg = {**SD21_CONFIG, "use_karras_sigmas": True, "prediction_type": prediction_type}
    _run_both(name, cfg, 12)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_parity_linear_schedule_defaults(name: str) -> None:
    """diffusers' defaults (linear betas, DDIM clip_sample=True, set_alpha_to_one=True)."""
    _run_both(name, {"_class_name": PAIRS[name][1]}, 10, abs_only=False)


@pytest.mark.parametrize("steps", [4, 10, 25])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_parity_pndm_runge_kutta_warmup(steps: int, prediction_type: str) -> None:
    """PNDM as diffusers defaults it (skip_prk_steps=False: 12 Runge-Kutta sub-steps first)."""
    cfg = {**SD21_CONFIG, "skip_prk_steps": False, "prediction_type": prediction_type}
    _run_both("pndm", cfg, steps)


def test_parity_dpm_sigma_min_final() -> None:
    _run_both("dpm++", {**SD21_CONFIG, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 10)


def test_factory_reads_class_name_and_override(tmp_path) -> None:
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**SD21_CONFIG, "_class_name": "EulerDiscreteScheduler"}))
    assert isinstance(scheduler_from_config(tmp_path), EulerDiscreteScheduler)
    assert isinstance(scheduler_from_config(path, name="ddim"), DDIMScheduler)
    s = scheduler_from_config(load_scheduler_config(path), name="DPMSolverMultistepScheduler")
    assert isinstance(s, DPMSolverMultistepScheduler)
    assert s.config.prediction_type == "v_prediction" and s.config.steps_offset == 1
    assert "skip_prk_steps" in s.config.ignored


def test_factory_rejects_unknown_class_listing_allowed() -> None:
    with pytest.raises(ValueError, match="LMSDiscreteScheduler.*allowed: DDIMScheduler"):
        scheduler_from_config({**SD21_CONFIG, "_class_name": "LMSDiscreteScheduler"})
    assert isinstance(scheduler_from_config({**SD21_CONFIG, "_class_name": "PNDMScheduler"}), PNDMScheduler)
    with pytest.raises(ValueError, match="scheduler='heun'"):
        scheduler_from_config(SD21_CONFIG, name="heun")


def test_bad_steps_and_config_values() -> None:
    s = DDIMScheduler.from_config(SD21_CONFIG)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        EulerDiscreteScheduler.from_config({"prediction_type": "flow"})
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+'"):
        DPMSolverMultistepScheduler.from_config({"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(FileNotFoundError, match="scheduler config not found"):
        load_scheduler_config("/nonexistent/scheduler")


if __name__ == "__main__":  # print the worst step-by-step difference per case (for the report)
    for n in sorted(PAIRS):
        for pt in ("epsilon", "v_prediction"):
            print(n, pt, max(_run_both(n, {**SD21_CONFIG, "prediction_type": pt}, s) for s in (1, 7, 20, 50)))
