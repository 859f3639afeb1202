"""numpy ports of diffusers' schedulers (DDIM, Euler, DPM-Solver++ multistep, PNDM/PLMS) for the torch-free
device.

One file per scheduler, each reading diffusers' ``scheduler_config.json``; the beta schedules and config
parsing they share live in ``_common.py``. The factory
picks the class from the config's ``_class_name`` (or a name the caller gives, as
``XScheduler.from_config(pipe.scheduler.config)`` does in diffusers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Union

from routet2i.bundle import read_json_object
from routet2i.schedulers.ddim import DDIMConfig, DDIMScheduler
from routet2i.schedulers.dpm_solver import DPMSolverMultistepConfig, DPMSolverMultistepScheduler
from routet2i.schedulers.euler import EulerDiscreteConfig, EulerDiscreteScheduler
from routet2i.schedulers.pndm import PNDMConfig, PNDMScheduler

logger = logging.getLogger(__name__)

Scheduler = Union[DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, PNDMScheduler]

# diffusers class name -> numpy port.
SCHEDULERS: dict[str, type] = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "PNDMScheduler": PNDMScheduler,  # what stabilityai/stable-diffusion-2-1-base ships (PLMS)
}
# Short names accepted by `scheduler_from_config(..., name=...)` and `EdgePipeline(scheduler=...)`.
ALIASES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "plms": "PNDMScheduler",
}

__all__ = [
    "ALIASES",
    "SCHEDULERS",
    "DDIMConfig",
    "DDIMScheduler",
    "DPMSolverMultistepConfig",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteConfig",
    "EulerDiscreteScheduler",
    "PNDMConfig",
    "PNDMScheduler",
    "Scheduler",
    "load_scheduler_config",
    "scheduler_from_config",
]


def load_scheduler_config(path: str | Path) -> dict[str, Any]:
    """Read a diffusers ``scheduler_config.json`` (a file, or a folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "scheduler_config.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: scheduler config not found")
    return read_json_object(p)


def _resolve(name: str) -> type:
    key = ALIASES.get(name.lower(), name)
    if key not in SCHEDULERS:
        allowed = sorted(SCHEDULERS) + sorted(ALIASES)
        raise ValueError(f"scheduler={name!r} is not supported; allowed: {', '.join(allowed)}")
    return SCHEDULERS[key]


def scheduler_from_config(config: Mapping[str, Any] | str | Path, name: str | None = None) -> Scheduler:
    """Build a numpy scheduler from a diffusers scheduler config (dict, file or folder).

    ``name`` (a diffusers class name or an alias: ddim, euler, dpm++) overrides the config's
    ``_class_name``; the config's values are reused as diffusers' ``from_config`` does (keys unknown to
    the class are ignored, missing ones take the class defaults).
    """
    if not isinstance(config, Mapping):
        config = load_scheduler_config(config)
    class_name = name or config.get("_class_name")
    if not class_name:
        raise ValueError("scheduler config has no _class_name; pass name= (ddim, euler or dpm++)")
    cls = _resolve(str(class_name))
    logger.debug("scheduler %s from config (_class_name=%s)", cls.__name__, config.get("_class_name"))
    return cls.from_config(config)
