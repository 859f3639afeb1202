"""Spec objects for every exported graph: names, dtypes, named dynamic axes, dummy inputs, opset.

After each export the graph is checked against its spec (``check_graph``) and run under ONNX Runtime
against the torch module on the spec's dummy inputs; every output that differs beyond its tolerance is
collected into one ``ExportValidationError`` (STYLE.md 4: optimum-onnx ``OnnxConfig``, onnxruntime's SD
tools).

Axes: a ``str`` names a dynamic axis, an ``int`` is a fixed size, ``None`` is a model-dependent size (a
hidden size, the number of metrics) that the graph check leaves alone: exporters differ in whether shape
inference records it, and the validation compares every output's shape with torch's anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TensorSpec",
    "GraphSpec",
    "OutputMismatch",
    "ExportValidationError",
    "compare_outputs",
    "EDGE_OPSET",
    "ROUTER_OPSET",
    "TEXT_ENCODER",
    "UNET",
    "VAE_DECODER",
    "VAE_ENCODER",
    "ROUTER",
]

EDGE_OPSET = 18  # optimum-onnx's default for Stable Diffusion; GroupNormalization-free, ORT CPU/CUDA/TRT
ROUTER_OPSET = 18  # LayerNormalization is a standard op from 17; 18 is what both torch exporters emit well

_DTYPES = {"float32": 1, "int32": 6, "int64": 7, "float16": 10}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str  # the ONNX value name (a contract: the runtime feeds and reads these names)
    dtype: str  # "float32" | "float16" | "int64" | "int32"
    axes: tuple[str | int | None, ...]  # str: named dynamic axis; int: fixed; None: model-dependent


@dataclass(frozen=True)
class GraphSpec:
    """What one exported graph must look like, and how to feed it for validation."""

    name: str  # graph name (bundle sub-folder for the edge graphs)
    inputs: tuple[TensorSpec, ...]  # in the order the exporter is called with
    outputs: tuple[TensorSpec, ...]
    opset: int  # default-domain opset the graph is exported with
    atol: float = 1e-3  # max abs diff allowed between torch and ONNX Runtime (fp32)
    rtol: float = 0.0  # plus rtol * |torch value|
    fp16_atol: float = 5e-2  # tolerance when the graph was converted to float16

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export``'s ``dynamic_axes`` argument."""
        out: dict[str, dict[int, str]] = {}
        for t in self.inputs + self.outputs:
            named = {i: a for i, a in enumerate(t.axes) if isinstance(a, str)}
            if named:
                out[t.name] = named
        return out

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dummy_inputs(
        self, dims: Mapping[str, int], sizes: Mapping[str, int] | None = None, seed: int = 0
    ) -> dict[str, np.ndarray]:
        """Random inputs: named axes from ``dims``, ``None`` axes from ``sizes[f"{input}.{axis}"]``.

        Integer inputs are token ids in [0, dims["vocab"]) (or a 0/1 mask when named ``attention_mask``);
        a 0-d float input is a timestep in [1, 999]."""
        rng = np.random.default_rng(seed)
        sizes = sizes or {}
        feeds: dict[str, np.ndarray] = {}
        for t in self.inputs:
            shape = []
            for i, a in enumerate(t.axes):
                if isinstance(a, str):
                    shape.append(int(dims[a]))
                elif isinstance(a, int):
                    shape.append(a)
                else:
                    shape.append(int(sizes[f"{t.name}.{i}"]))
            if t.dtype in ("int64", "int32"):
                if t.name == "attention_mask":
                    arr = np.ones(shape, dtype=t.dtype)
                else:
                    arr = rng.integers(0, int(dims["vocab"]), size=shape).astype(t.dtype)
            elif not shape:
                arr = np.asarray(rng.uniform(1, 999), dtype=t.dtype)
            else:
                arr = rng.standard_normal(shape).astype(t.dtype)
            feeds[t.name] = arr
        return feeds

    def check_graph(self, path: str | Path, expect_dtype: str | None = None) -> list[str]:
        """Problems of the ONNX file at ``path`` against this spec (empty list: it conforms).

        ``expect_dtype`` overrides the float dtype of every float tensor (a float16 graph)."""
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        problems: list[str] = []
        opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
        if opsets.get("ai.onnx") != self.opset:
            problems.append(f"{self.name}: opset {opsets.get('ai.onnx')} (spec: {self.opset})")
        for kind, specs, values in (
            ("input", self.inputs, model.graph.input),
            ("output", self.outputs, model.graph.output),
        ):
            by_name = {v.name: v for v in values}
            for t in specs:
                v = by_name.get(t.name)
                if v is None:
                    problems.append(f"{self.name}: missing {kind} {t.name!r} (has {sorted(by_name)})")
                    continue
                tt = v.type.tensor_type
                want = t.dtype if expect_dtype is None or not t.dtype.startswith("float") else expect_dtype
                if tt.elem_type != _DTYPES[want]:
                    got = onnx.TensorProto.DataType.Name(tt.elem_type)
                    problems.append(f"{self.name}: {kind} {t.name} dtype {got} (spec: {want})")
                dims = list(tt.shape.dim)
                if len(dims) != len(t.axes):
                    problems.append(f"{self.name}: {kind} {t.name} rank {len(dims)} (spec: {len(t.axes)})")
                    continue
                for i, (d, a) in enumerate(zip(dims, t.axes, strict=True)):
                    dynamic = bool(d.dim_param) or not d.HasField("dim_value")
                    if isinstance(a, str) and not dynamic:
                        problems.append(
                            f"{self.name}: {kind} {t.name} axis {i} ({a}) is static {d.dim_value}"
                        )
                    elif isinstance(a, int) and (dynamic or d.dim_value != a):
                        problems.append(f"{self.name}: {kind} {t.name} axis {i} is {d.dim_value} (spec: {a})")
        return problems


@dataclass(frozen=True)
class OutputMismatch:
    """One output of one validation case that ONNX Runtime got wrong."""

    graph: str  # graph (or "pipeline")
    output: str  # output name
    case: str  # which inputs, e.g. "batch=2 seq=16"
    max_abs_diff: float  # max |torch - ort| (inf for a shape mismatch or non-finite values)
    atol: float  # the bound it broke
    detail: str = ""  # shape mismatch, NaN, ...

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.graph}.{self.output} [{self.case}]: max abs diff {self.max_abs_diff:.3g} > {self.atol:g}{extra}"


class ExportValidationError(RuntimeError):
    """ONNX Runtime disagrees with torch (or the graph breaks its spec): lists every failing output."""

    def __init__(self, what: str, failures: list[OutputMismatch], problems: list[str] | None = None):
        self.what = what
        self.failures = list(failures)
        self.problems = list(problems or [])
        lines = [str(f) for f in self.failures] + self.problems
        super().__init__(
            f"{what}: validation failed for {len(lines)} output(s)/check(s):\n  " + "\n  ".join(lines)
        )


def compare_outputs(
    graph: str,
    case: str,
    reference: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    atol: float,
    rtol: float = 0.0,
    diffs: dict[str, float] | None = None,
) -> list[OutputMismatch]:
    """Compare named outputs; returns the mismatches and records every max abs diff into ``diffs``."""
    failures = []
    for name, ref in reference.items():
        ref = np.asarray(ref, dtype=np.float64)
        got = actual.get(name)
        if got is None:
            failures.append(OutputMismatch(graph, name, case, float("inf"), atol, "output missing"))
            continue
        got = np.asarray(got, dtype=np.float64)
        if got.shape != ref.shape:
            failures.append(
                OutputMismatch(graph, name, case, float("inf"), atol, f"shape {got.shape} != {ref.shape}")
            )
            continue
        if not np.isfinite(got).all():
            failures.append(OutputMismatch(graph, name, case, float("inf"), atol, "non-finite values"))
            continue
        diff = np.abs(got - ref)
        max_diff = float(diff.max()) if diff.size else 0.0
        if diffs is not None:
            key = f"{graph}.{name}"
            diffs[key] = max(diffs.get(key, 0.0), max_diff)
        if (diff > atol + rtol * np.abs(ref)).any():
            failures.append(OutputMismatch(graph, name, case, max_diff, atol))
    return failures


# ------------------------------------------------------------------------- the edge graphs (optimum layout)

TEXT_ENCODER = GraphSpec(
    name="text_encoder",
    inputs=(TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),),
    outputs=(
        TensorSpec("last_hidden_state", "float32", ("batch_size", "sequence_length", None)),
        TensorSpec("pooler_output", "float32", ("batch_size", None)),
    ),
    opset=EDGE_OPSET,
)
UNET = GraphSpec(
    name="unet",
    inputs=(
        TensorSpec("sample", "float32", ("batch_size", 4, "height", "width")),
        TensorSpec("timestep", "float32", ()),
        TensorSpec("encoder_hidden_states", "float32", ("batch_size", "sequence_length", None)),
    ),
    outputs=(TensorSpec("out_sample", "float32", ("batch_size", 4, "height", "width")),),
    opset=EDGE_OPSET,
)
VAE_DECODER = GraphSpec(
    name="vae_decoder",
    inputs=(TensorSpec("latent_sample", "float32", ("batch_size", 4, "latent_height", "latent_width")),),
    outputs=(TensorSpec("sample", "float32", ("batch_size", 3, "image_height", "image_width")),),
    opset=EDGE_OPSET,
)
VAE_ENCODER = GraphSpec(
    name="vae_encoder",
    inputs=(TensorSpec("sample", "float32", ("batch_size", 3, "image_height", "image_width")),),
    outputs=(TensorSpec("latent_parameters", "float32", ("batch_size", 8, "latent_height", "latent_width")),),
    opset=EDGE_OPSET,
)
EDGE_GRAPHS = {g.name: g for g in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}

# ------------------------------------------------------------------------------------------------ the router

ROUTER = GraphSpec(
    name="router",
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int64", ("batch", "sequence")),
    ),
    outputs=(
        TensorSpec("prs", "float32", ("batch",)),
        TensorSpec("metric_scores", "float32", ("batch", None)),
    ),
    opset=ROUTER_OPSET,
    atol=1e-4,  # issue 6: max abs diff <= 1e-4
)


@dataclass
class GraphReport:
    """What happened to one exported graph (goes into the manifest and the summary)."""

    name: str  # graph name
    bytes: int = 0  # size on disk (model.onnx + external data)
    dtype: str = "float32"  # float32 | float16 (io types stay float32 with --fp16)
    fused_ops: dict[str, int] = field(default_factory=dict)  # ORT transformer optimizer fusion counts
    validated: bool = False  # torch vs ORT on CPU passed
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # per output
    not_validated_reason: str = ""  # why it could not be validated here (e.g. CUDA-only fused ops)
    fp32_kept: list[str] = field(default_factory=list)  # node groups kept in float32 under --fp16

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v not in ("", [], {})}
