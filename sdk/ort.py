"""A thin ONNX Runtime wrapper for the device: explicit execution providers, latency-tuned session options,
input dtypes read from the session, IO binding on GPU providers.

Providers: by default the best available of TensorRT -> CUDA -> CPU (CPU is always appended as the
fallback ONNX Runtime needs for unsupported nodes); or exactly what the caller names (full names such as
``"CUDAExecutionProvider"``, short names such as ``"cuda"``, or ``(name, options)`` pairs). A named provider
this onnxruntime build does not have is an error that lists the ones it has. The choice is logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from routet2i._errors import BundleError, BundleFileMissing, UsageError

logger = logging.getLogger(__name__)

# Best first: what `providers=None` picks from.
DEFAULT_PRIORITY = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
# Providers whose memory is not host memory: IO binding avoids extra copies there.
GPU_PROVIDERS = {
    "TensorrtExecutionProvider": "cuda",
    "CUDAExecutionProvider": "cuda",
    "ROCMExecutionProvider": "cuda",
    "MIGraphXExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}
ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
}
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_OPT_LEVELS = ("disable", "basic", "extended", "all")

ProviderSpec = Union[str, tuple[str, Mapping[str, Any]]]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "onnxruntime is not installed: pip install 'routet2i[edge]' (CPU) or 'routet2i[edge-gpu]' (CUDA)"
        ) from exc
    return onnxruntime


@dataclass
class SessionConfig:
    """ONNX Runtime session options, tuned for latency of one request at a time."""

    intra_op_threads: int = 0  # threads inside one op; 0: ONNX Runtime's default (one per physical core)
    inter_op_threads: int = 1  # threads across independent ops (sequential execution uses 1)
    graph_optimization: str = "all"  # "disable" | "basic" | "extended" | "all" (layout and fusions)
    cpu_mem_arena: bool = True  # reuse CPU allocations across runs (fewer mallocs per step)
    mem_pattern: bool = True  # plan memory from the first run's shapes (fixed-shape models benefit)
    allow_spinning: bool = True  # worker threads spin between ops: lower latency, busier cores
    io_binding: bool | None = None  # None: on GPU providers only; True/False forces it
    log_severity: int = 3  # ONNX Runtime's own log level (0 verbose .. 4 fatal)

    def __post_init__(self) -> None:
        if self.graph_optimization not in _OPT_LEVELS:
            raise UsageError(
                f"graph_optimization={self.graph_optimization!r} is not one of {', '.join(_OPT_LEVELS)}"
            )
        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise UsageError(
                f"intra_op_threads={self.intra_op_threads}, inter_op_threads={self.inter_op_threads}: must be >= 0"
            )


def available_providers() -> list[str]:
    return list(_onnxruntime().get_available_providers())


def provider_name(spec: ProviderSpec) -> str:
    name = spec[0] if isinstance(spec, tuple) else spec
    if not isinstance(name, str):
        raise UsageError(f"provider {spec!r}: expected a name or a (name, options) pair")
    return ALIASES.get(name.lower(), name)


def resolve_providers(providers: str | Sequence[ProviderSpec] | None = None) -> list[ProviderSpec]:
    """The providers to create a session with, best first.

    ``None`` (or the environment variable ``ROUTET2I_PROVIDERS``, comma-separated): the available ones of
    TensorRT -> CUDA -> CPU. Otherwise the named ones, each of which must be available.
    """
    available = available_providers()
    if providers is None and os.environ.get("ROUTET2I_PROVIDERS"):
        providers = [p.strip() for p in os.environ["ROUTET2I_PROVIDERS"].split(",") if p.strip()]
    if providers is None:
        chosen: list[ProviderSpec] = [p for p in DEFAULT_PRIORITY if p in available]
        return chosen or available[:1]
    if isinstance(providers, str):
        providers = [providers]
    if not providers:
        raise UsageError(f"providers=[]: name at least one; available: {', '.join(available)}")
    chosen = []
    for spec in providers:
        name = provider_name(spec)
        if name not in available:
            raise UsageError(
                f"execution provider {name!r} is not available in this onnxruntime build "
                f"({_onnxruntime().__version__}); available: {', '.join(available)}"
            )
        chosen.append((name, dict(spec[1])) if isinstance(spec, tuple) else name)
    names = {provider_name(p) for p in chosen}
    # TensorRT hands the nodes it cannot build engines for to CUDA (ONNX Runtime's recommended chain).
    if (
        "TensorrtExecutionProvider" in names
        and "CUDAExecutionProvider" in available
        and "CUDAExecutionProvider" not in names
    ):
        chosen.insert(
            [provider_name(p) for p in chosen].index("TensorrtExecutionProvider") + 1, "CUDAExecutionProvider"
        )
    # CPU as the last resort for nodes a GPU provider does not implement (ONNX Runtime needs it).
    if "CPUExecutionProvider" in available and "CPUExecutionProvider" not in names:
        chosen.append("CPUExecutionProvider")
    return chosen


def session_options(config: SessionConfig | None = None) -> Any:
    ort = _onnxruntime()
    cfg = config or SessionConfig()
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg.intra_op_threads
    so.inter_op_num_threads = cfg.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[cfg.graph_optimization]
    so.enable_cpu_mem_arena = cfg.cpu_mem_arena
    so.enable_mem_pattern = cfg.mem_pattern
    so.log_severity_level = cfg.log_severity
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.allow_spinning else "0")
    return so


class OrtModel:
    """One ONNX model in one ONNX Runtime session, created once and reused.

    ``model(**inputs) -> {output_name: np.ndarray}``: inputs are cast to the dtypes the model declares
    (so an int timestep goes in as the model's float or int64 without the caller knowing which).
    """

    def __init__(
        self,
        path: str | Path,
        providers: str | Sequence[ProviderSpec] | None = None,
        config: SessionConfig | None = None,
    ) -> None:
        ort = _onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleFileMissing(f"{self.path}: ONNX model not found")
        self.config = config or SessionConfig()
        chosen = resolve_providers(providers)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=session_options(self.config), providers=chosen
            )
        except Exception as exc:  # onnxruntime raises its own InvalidProtobuf/InvalidGraph/... types
            if type(exc).__name__ in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile"):
                raise BundleError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from None
            raise
        self.providers: list[str] = list(self.session.get_providers())
        self.input_types: dict[str, Any] = {}
        self.input_shapes: dict[str, list[Any]] = {}
        for arg in self.session.get_inputs():
            if arg.type not in _ORT_TYPES:
                raise BundleError(f"{self.path}: input {arg.name!r} has unsupported type {arg.type}")
            self.input_types[arg.name] = _ORT_TYPES[arg.type]
            self.input_shapes[arg.name] = list(arg.shape)
        self.output_names: list[str] = [o.name for o in self.session.get_outputs()]
        primary = self.providers[0]
        use_binding = self.config.io_binding
        self.io_binding = (primary in GPU_PROVIDERS) if use_binding is None else bool(use_binding)
        self._device = GPU_PROVIDERS.get(primary, "cpu")
        logger.info(
            "ONNX Runtime %s: %s on %s (requested %s; io_binding=%s)",
            ort.__version__,
            f"{self.path.parent.name}/{self.path.name}",
            self.providers,
            [provider_name(p) for p in chosen],
            self.io_binding,
        )

    def _feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = sorted(set(self.input_types) - set(inputs))
        extra = sorted(set(inputs) - set(self.input_types))
        if missing or extra:
            raise ValueError(
                f"{self.path.name}: inputs {sorted(inputs)} do not match the model's {sorted(self.input_types)}"
                f" (missing {missing}, unexpected {extra})"
            )
        feed = {}
        for name, value in inputs.items():
            arr = np.asarray(value, dtype=self.input_types[name])
            # (np.ascontiguousarray would turn a 0-d timestep into shape [1])
            feed[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")
        return feed

    def __call__(self, **inputs: Any) -> dict[str, np.ndarray]:
        feed = self._feed(inputs)
        if not self.io_binding:
            return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self._device)  # allocated by ONNX Runtime on the device
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu(), strict=True))
