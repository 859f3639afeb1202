"""A thin ONNX Runtime wrapper for the device: explicit execution providers, latency-tuned session options,
input dtypes read from the session, IO binding on GPU providers.

Providers: by default the best available of TensorRT -> CUDA -> CPU (CPU is always appended as the
fallback ONNX Runtime needs for unsupported nodes); or exactly what the caller names (full names such as
``"CUDAExecutionProvider"``, short names such as ``"cuda"``, or ``(name, options)`` pairs). A named provider
this onnxruntime build does not have is an error that lists the ones it has. The choice is logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from routet2i._errors import BundleError, BundleFileMissing, UsageError
from routet2i.paths import atomic_write

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
    graph_cache: bool = True  # keep ONNX Runtime's optimized graph in the user cache dir (CPU provider only;
    # see GraphCache)

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


def session_options(config: SessionConfig | None = None, optimization: str | None = None) -> Any:
    """ONNX Runtime SessionOptions from ``config``; ``optimization`` overrides its graph_optimization."""
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
    }[optimization or cfg.graph_optimization]
    so.enable_cpu_mem_arena = cfg.cpu_mem_arena
    so.enable_mem_pattern = cfg.mem_pattern
    so.log_severity_level = cfg.log_severity
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if cfg.allow_spinning else "0")
    return so


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class GraphCache:
    """ONNX Runtime's optimized form of one graph, saved on its first load and loaded with graph
    optimization off afterwards (``SessionOptions.optimized_model_filepath``).

    Lives in ``cache_dir/ort/<graph>-<key>/``, never in the bundle. The key covers what the optimized graph
    depends on: ``source_key`` (the bundle's manifest sha256 and the graph's path in it), the onnxruntime
    version, the providers and their options, the optimization level, and this machine's CPU (level "all"
    lays weights out for the CPU it ran on). A cached graph is used only when its files' stamps (size,
    mtime, ctime, inode) are those recorded when it was written; one that fails to load is deleted and the
    bundle's graph is loaded instead. One entry per graph path: writing a new one removes older ones."""

    def __init__(
        self, cache_dir: Path, graph: Path, source_key: str, providers: list[Any], level: str
    ) -> None:
        ort = _onnxruntime()
        spec = json.dumps(
            [source_key, ort.__version__, [provider_name(p) for p in providers], _options(providers), level,
             platform.machine(), _cpu_name()],
            sort_keys=True,
            default=str,
        )  # fmt: skip
        self.prefix = hashlib.sha256(str(graph.resolve()).encode()).hexdigest()[:16]
        self.folder = (
            Path(cache_dir) / "ort" / f"{self.prefix}-{hashlib.sha256(spec.encode()).hexdigest()[:16]}"
        )
        self.model = self.folder / "model.onnx"
        self.stamps = self.folder / "stamps.json"

    def ready(self) -> bool:
        try:
            recorded = json.loads(self.stamps.read_text())
            return all(_stamp(self.folder / name) == stamp for name, stamp in recorded.items())
        except (OSError, ValueError, TypeError, AttributeError):
            return False

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def staging(self) -> Path:
        """A fresh folder to write the optimized graph into (``publish`` moves it into place)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.parent.glob(f".{self.prefix}-*"):  # left by a process killed mid-write
            try:
                if time.time() - stale.stat().st_mtime > 3600:
                    shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                continue
        return Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))

    def publish(self, staged: Path) -> None:
        if not (staged / "model.onnx").is_file():
            raise OSError(f"ONNX Runtime wrote no optimized graph into {staged}")
        for old in self.folder.parent.glob(f"{self.prefix}-*"):  # older keys of this graph path
            shutil.rmtree(old, ignore_errors=True)
        staged.rename(self.folder)
        stamps = {p.name: _stamp(p) for p in self.folder.iterdir() if p.is_file()}
        atomic_write(self.stamps, json.dumps(stamps), fsync=False)  # a cache: rebuilt if lost


def _options(providers: list[Any]) -> list[Any]:
    return [dict(p[1]) if isinstance(p, tuple) else {} for p in providers]


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
        *,
        cache_dir: str | Path | None = None,
        cache_key: str | None = None,
    ) -> None:
        ort = _onnxruntime()
        t0 = time.perf_counter()
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleFileMissing(f"{self.path}: ONNX model not found")
        self.config = config or SessionConfig()
        chosen = resolve_providers(providers)
        self.graph_cache = "off"  # "off" | "hit" (loaded the cached optimized graph) | "written" | "failed"
        cache = None
        if (
            self.config.graph_cache
            and cache_key
            and self.config.graph_optimization != "disable"
            and all(provider_name(p) == "CPUExecutionProvider" for p in chosen)
        ):  # GPU providers: not cached (untested without a GPU here; TensorRT has its own engine cache)
            from routet2i.paths import user_cache_dir

            cache = GraphCache(
                Path(cache_dir) if cache_dir else user_cache_dir(),
                self.path,
                cache_key,
                chosen,
                self.config.graph_optimization,
            )
        self.session = None
        if cache is not None and cache.ready():
            try:
                self.session = ort.InferenceSession(
                    str(cache.model),
                    sess_options=session_options(self.config, optimization="disable"),
                    providers=chosen,
                )
                self.graph_cache = "hit"
            except Exception as exc:  # a corrupt cache entry must never stop a launch
                logger.warning(
                    "optimized-graph cache %s unusable (%s): deleted, loading %s",
                    cache.folder,
                    exc,
                    self.path,
                )
                cache.discard()
        if self.session is None:
            self.session = self._create(ort, chosen, cache)
        self.load_seconds = time.perf_counter() - t0
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
            "ONNX Runtime %s: %s on %s (requested %s; io_binding=%s) in %.2fs, optimized-graph cache: %s",
            ort.__version__,
            f"{self.path.parent.name}/{self.path.name}",
            self.providers,
            [provider_name(p) for p in chosen],
            self.io_binding,
            self.load_seconds,
            self.graph_cache,
        )

    def _create(self, ort: Any, chosen: list[ProviderSpec], cache: GraphCache | None) -> Any:
        """A session from the bundle's graph; with a cache, ONNX Runtime also saves its optimized graph."""
        so = session_options(self.config)
        staged = None
        if cache is not None:
            try:
                staged = cache.staging()
                so.optimized_model_filepath = str(staged / "model.onnx")
                # Weights go to one external file (graphs over 2 GB cannot be one protobuf).
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_file_name", "model.onnx.data"
                )
                so.add_session_config_entry(
                    "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
                )
            except OSError as exc:
                logger.info("optimized-graph cache not writable (%s): not caching %s", exc, self.path)
                so, staged = session_options(self.config), None
        try:
            session = ort.InferenceSession(str(self.path), sess_options=so, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own InvalidProtobuf/InvalidGraph/... types
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
                if type(exc).__name__ not in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile"):
                    # Saving the optimized graph may be what failed: load once more without it.
                    logger.warning("saving the optimized graph of %s failed (%s): not cached", self.path, exc)
                    self.graph_cache = "failed"
                    return self._create(ort, chosen, None)
            if type(exc).__name__ in ("InvalidProtobuf", "InvalidGraph", "NoSuchFile"):
                raise BundleError(f"{self.path}: ONNX Runtime cannot load it ({exc})") from None
            raise
        if staged is not None and cache is not None:
            try:
                cache.publish(staged)
                self.graph_cache = "written"
            except OSError as exc:
                logger.warning("cannot keep the optimized graph of %s (%s)", self.path, exc)
                shutil.rmtree(staged, ignore_errors=True)
                self.graph_cache = "failed"
        return session

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
