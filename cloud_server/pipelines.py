"""What the server generates with: any SD3-architecture diffusers pipeline, or a no-op for tests/benchmarks.

A pipeline takes a *batch* of compatible requests (same size, steps and guidance; prompts, negative prompts
and seeds differ) and returns one PIL image per request. Each request keeps its own seed: the SD3 pipeline
gets a list of CPU `torch.Generator`s, one per image, so an image does not depend on its batch neighbours
(up to float rounding of batched kernels).

torch and diffusers are imported only when a diffusers pipeline is loaded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

# on_step(step, total_steps) -> True asks the pipeline to stop early (every request of the batch is gone).
StepCallback = Callable[[int, int], bool]


@dataclass(frozen=True)
class GenParams:
    prompt: str  # validated, non-empty
    negative_prompt: str  # may be empty
    width: int  # pixels, a multiple of the pipeline's size_multiple
    height: int  # pixels, a multiple of the pipeline's size_multiple
    steps: int  # denoising steps
    guidance: float  # classifier-free guidance scale
    seed: int  # uint64

    def batch_key(self) -> tuple[int, int, int, float]:
        """Requests with equal keys can share one pipeline call."""
        return (self.width, self.height, self.steps, self.guidance)


class Pipeline(Protocol):
    model_name: str  # reported in GenerateResponse.model
    size_multiple: int  # width and height must be multiples of this
    max_size: int  # the largest width/height the model supports
    default_size: int  # width/height when a request asks for 0

    def generate(self, items: list[GenParams], on_step: StepCallback) -> list[Any]:
        """One PIL image per item, in order."""


class NoOpPipeline:
    """No model: a solid image whose colour comes from (prompt, seed); optional sleep per step.

    For tests and the per-request overhead benchmark (`routet2i-cloud serve --pipeline noop`)."""

    def __init__(self, step_delay_s: float = 0.0, model_name: str = "noop") -> None:
        self.model_name = model_name
        self.size_multiple = 8
        self.max_size = 4096
        self.default_size = 64
        self.step_delay_s = step_delay_s
        self.calls: list[int] = []  # batch size of every call (tests read it)

    def generate(self, items: list[GenParams], on_step: StepCallback) -> list[Any]:
        from PIL import Image

        self.calls.append(len(items))
        steps = items[0].steps
        for i in range(steps):
            if self.step_delay_s:
                time.sleep(self.step_delay_s)
            if on_step(i + 1, steps):
                break
        images = []
        for it in items:
            digest = hashlib.sha256(f"{it.prompt}\0{it.seed}".encode()).digest()
            images.append(Image.new("RGB", (it.width, it.height), tuple(digest[:3])))
        return images


class SD3Pipeline:
    """A diffusers `StableDiffusion3Pipeline` loaded from a folder or a Hugging Face id."""

    def __init__(
        self, spec: str, device: str | None = None, dtype: str | None = None, torch_threads: int | None = None
    ) -> None:
        if spec.startswith(("/", "./", "../", "~")) and not Path(spec).expanduser().is_dir():
            raise FileNotFoundError(f"--pipeline {spec}: no such folder")
        import torch
        from diffusers import StableDiffusion3Pipeline

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = device or _best_device(torch)
        torch_dtype = _resolve_dtype(torch, dtype, self.device)
        t0 = time.perf_counter()
        try:
            self.pipe = StableDiffusion3Pipeline.from_pretrained(spec, torch_dtype=torch_dtype)
        except (OSError, ValueError, TypeError) as e:
            raise ValueError(
                f"--pipeline {spec!r}: could not load an SD3 diffusers pipeline from it ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from e
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self._torch = torch
        self.model_name = pipeline_name(spec)
        cfg = self.pipe.transformer.config
        self.size_multiple = int(self.pipe.vae_scale_factor * cfg.patch_size)
        pos_max = getattr(cfg, "pos_embed_max_size", None)
        self.max_size = int(pos_max * cfg.patch_size * self.pipe.vae_scale_factor) if pos_max else 2048
        self.default_size = int(cfg.sample_size * self.pipe.vae_scale_factor)
        logger.info(
            "pipeline loaded spec=%s device=%s dtype=%s seconds=%.1f size_multiple=%d max_size=%d",
            spec, self.device, torch_dtype, time.perf_counter() - t0, self.size_multiple, self.max_size,
        )  # fmt: skip

    def generate(self, items: list[GenParams], on_step: StepCallback) -> list[Any]:
        torch = self._torch
        first = items[0]
        generators = [torch.Generator(device="cpu").manual_seed(it.seed) for it in items]

        def callback(pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
            if on_step(i + 1, first.steps):
                pipe._interrupt = True
            return {}

        with torch.inference_mode():
            out = self.pipe(
                prompt=[it.prompt for it in items],
                negative_prompt=[it.negative_prompt for it in items],
                width=first.width,
                height=first.height,
                num_inference_steps=first.steps,
                guidance_scale=first.guidance,
                generator=generators,
                output_type="pil",
                callback_on_step_end=callback,
            )
        return list(out.images)


def _best_device(torch: Any) -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _resolve_dtype(torch: Any, dtype: str | None, device: str) -> Any:
    if dtype is None:
        return torch.float16 if device.startswith(("cuda", "mps")) else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(table)}")
    return table[dtype]


def pipeline_name(spec: str) -> str:
    """The name a pipeline given as a bare `spec` is served under: the folder's (or Hugging Face id's) last
    part; `noop` for the no-op pipeline."""
    return spec.rstrip("/").split("/")[-1] if "/" in spec else spec


def load_pipeline(
    spec: str,
    device: str | None = None,
    dtype: str | None = None,
    noop_step_delay_s: float = 0.0,
    torch_threads: int | None = None,
) -> Pipeline:
    """`noop` -> `NoOpPipeline`; anything else is a diffusers folder or Hugging Face id of an SD3 pipeline."""
    if spec == "noop":
        return NoOpPipeline(step_delay_s=noop_step_delay_s)
    return SD3Pipeline(spec, device=device, dtype=dtype, torch_threads=torch_threads)
