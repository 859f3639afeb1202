"""`routet2i export edge`: an SD2.1-architecture diffusers pipeline to a validated ONNX edge bundle.

The bundle is optimum-onnx's Stable Diffusion layout (``model_index.json``, ``text_encoder/model.onnx``,
``unet/model.onnx``, ``vae_decoder/model.onnx``, optional ``vae_encoder/``, ``tokenizer/``, ``scheduler/``)
so ``optimum.onnxruntime.ORTStableDiffusionPipeline.from_pretrained(bundle)`` loads it, plus
``tokenizer/tokenizer.json`` (the torch-free device runtime reads it with ``tokenizers``) and
``manifest.json`` (sha256 of every file, versions, allowed image sizes, what was validated).

Stages: check the pipeline is SD2.1-shaped -> optimum-onnx ``main_export`` -> optional ONNX Runtime
transformer optimizer (``--optimize``) -> optional float16 conversion (``--fp16``) -> check each graph
against its spec (``routet2i.export.specs``) -> torch vs ONNX Runtime per graph on dummy inputs -> torch
pipeline vs ORT pipeline on fixed latents -> manifest -> rename the temporary folder into place.

What ``--optimize`` and ``--fp16`` mean on this CPU:
- ``--optimize`` runs onnxruntime.transformers' Stable Diffusion fusions (the ones
  ``optimize_pipeline.py`` runs). ``--optimize-target gpu`` (default) keeps every fusion; several fused ops
  it emits (GroupNorm, SkipGroupNorm, BiasSplitGelu, NhwcConv, BiasAdd) have CUDA kernels only, so such
  graphs cannot run or be validated on a CPU: the manifest says which graphs were not validated and why.
  ``--optimize-target cpu`` turns the CUDA-only fusions off; the result is validated like an fp32 export.
  ORT's UNet attention fusion fails with numpy >= 2 (``int()`` of a 1-element array in
  ``FusionAttentionUnet.get_num_heads``); ``_patched_unet_attention_fusion`` fixes that for the call.
- ``--fp16`` converts weights and compute to float16 with float32 inputs/outputs, for GPU execution
  providers. Kept in float32: the attention score path (Q.K^T, scale, Softmax and .V; the projections are
  fp16) in the UNet and in the VAE's mid-block attention. SD2.1 (768-v) overflows float16 there and
  produces black/NaN images; diffusers ships ``upcast_attention=True`` in its UNet config for that reason.
  ORT's CPU provider lacks float16 kernels for some ops; a graph it cannot run is recorded as not
  validated instead of failing the export.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routet2i._errors import UsageError
from routet2i.bundle import publish_folder
from routet2i.export._log import cli_progress
from routet2i.export.specs import (
    EDGE_GRAPHS,
    EDGE_OPSET,
    ExportValidationError,
    GraphReport,
    GraphSpec,
    OutputMismatch,
    compare_outputs,
)
from routet2i.paths import check_output_path

logger = logging.getLogger(__name__)

__all__ = ["EdgeExportConfig", "EdgeExportResult", "export_edge", "check_sd21_shaped", "add_arguments", "run"]

SIZE_MULTIPLE = 64  # 8 (VAE) x 2^3 (the UNet's three down-samplings)
# Fusions whose fused ops have CUDA kernels only (FusionOptions attribute names).
_GPU_ONLY_FUSIONS = (
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_nhwc_conv",
)
_GPU_ONLY_OPS = {"GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "NhwcConv", "BiasAdd", "BiasGelu"}
_ORT_MODEL_TYPE = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "vae_encoder": "vae"}


@dataclass
class EdgeExportConfig:
    """One `export edge` run."""

    pipeline: str  # diffusers folder or Hugging Face id of an SD2.1-shaped StableDiffusionPipeline
    out: Path  # bundle folder to create
    fp16: bool = False  # float16 weights/compute (GPU providers), attention score path kept in float32
    optimize: bool = False  # ONNX Runtime transformer optimizer (SD fusions)
    optimize_target: str = "gpu"  # "gpu": all fusions (CUDA-only ops) | "cpu": CUDA-only fusions off
    force: bool = False  # replace an existing non-empty --out
    sizes: list[tuple[int, int]] | None = None  # allowed (width, height); None: any multiple of 64 in range
    max_side: int = 1024  # largest width/height the bundle allows when sizes is None
    vae_encoder: bool = True  # keep the VAE encoder (img2img); the text-to-image path does not need it
    validate_steps: int = 2  # denoising steps of the pipeline-level validation
    validate_size: tuple[int, int] | None = None  # (width, height) validated; None: smallest allowed
    pipeline_atol: float = 2e-3  # max abs diff on [0, 1] images, fp32 (fp16: 0.1)
    opset: int = EDGE_OPSET  # ONNX opset
    sign_key: Path | None = None  # Ed25519 private key (PEM): sign manifest.json into manifest.sig


@dataclass
class EdgeExportResult:
    """What `export_edge` produced."""

    bundle: Path  # the bundle folder
    graphs: dict[str, GraphReport] = field(default_factory=dict)  # per graph
    pipeline_max_abs_diff: float | None = None  # torch vs ORT pipeline, None when not validated
    pipeline_validated: bool = False  # the pipeline comparison ran and passed
    seconds: float = 0.0  # total wall time
    manifest: dict[str, Any] = field(default_factory=dict)  # the written manifest


# ------------------------------------------------------------------------------------------------ checking


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--pipeline: {path} is missing (not a diffusers pipeline folder)") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--pipeline: {path} is not valid JSON ({exc})") from None


def _pipeline_configs(pipeline: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(model_index, unet config, vae config) from a folder or a hub id (hub: downloads the JSON only)."""
    folder = Path(pipeline)
    if folder.is_dir():
        index = _load_json(folder / "model_index.json")
        if index.get("_class_name") != "StableDiffusionPipeline":
            raise UsageError(
                f"--pipeline {pipeline}: not an SD2.1-shaped pipeline: "
                f"_class_name={index.get('_class_name')!r} (SD2.1: 'StableDiffusionPipeline')"
            )
        return (
            index,
            _load_json(folder / "unet" / "config.json"),
            _load_json(folder / "vae" / "config.json"),
        )
    if folder.exists() or pipeline.startswith((".", "/")) or pipeline.count("/") != 1:
        raise UsageError(f"--pipeline {pipeline}: not a folder and not a Hugging Face id (owner/name)")
    from routet2i.training.hub import check_hub_id

    check_hub_id(pipeline, "--pipeline")  # an unreachable hub: one line that suggests a local folder
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    try:
        return (
            dict(DiffusionPipeline.load_config(pipeline)),
            dict(UNet2DConditionModel.load_config(pipeline, subfolder="unet")),
            dict(AutoencoderKL.load_config(pipeline, subfolder="vae")),
        )
    except Exception as exc:  # hub errors come in many classes; one line is what the user needs
        raise UsageError(
            f"--pipeline {pipeline}: cannot read its configs ({type(exc).__name__}: {exc})"
        ) from None


def check_sd21_shaped(pipeline: str) -> dict[str, Any]:
    """Refuse anything that is not an SD2.1-architecture StableDiffusionPipeline; return the unet config."""
    index, unet, vae = _pipeline_configs(pipeline)
    wanted = {
        "_class_name": (index.get("_class_name"), "StableDiffusionPipeline"),
        "unet": ((index.get("unet") or [None, None])[1], "UNet2DConditionModel"),
        "text_encoder": ((index.get("text_encoder") or [None, None])[1], "CLIPTextModel"),
        "vae": ((index.get("vae") or [None, None])[1], "AutoencoderKL"),
        "unet.in_channels": (unet.get("in_channels"), 4),
        "unet.use_linear_projection": (unet.get("use_linear_projection"), True),
        "vae.latent_channels": (vae.get("latent_channels"), 4),
        "unet down blocks": (len(unet.get("down_block_types") or []), 4),
    }
    wrong = [f"{k}={got!r} (SD2.1: {want!r})" for k, (got, want) in wanted.items() if got != want]
    if not isinstance(unet.get("attention_head_dim"), (list, tuple)):
        wrong.append(f"unet.attention_head_dim={unet.get('attention_head_dim')!r} (SD2.1: one per block)")
    if wrong:
        raise UsageError(f"--pipeline {pipeline}: not an SD2.1-shaped pipeline: " + "; ".join(wrong))
    return unet


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(f"--out {out}: folder exists and is not empty (pass --force to replace it)")
    check_output_path(out, "--out", folder=True)


def parse_size(text: str, what: str = "--sizes") -> tuple[int, int]:
    """'512x768' -> (512, 768), each a positive multiple of 64."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
    if w <= 0 or h <= 0 or w % SIZE_MULTIPLE or h % SIZE_MULTIPLE:
        raise UsageError(
            f"{what} {text!r}: width and height must be positive multiples of {SIZE_MULTIPLE} "
            "(the exported UNet down-samples the 1/8 latent three times)"
        )
    return w, h


# ----------------------------------------------------------------------------------------------- the stages


def _say(stage: str, message: str) -> None:
    logger.info("[export edge] %s: %s", stage, message)  # shown by the CLI (routet2i.export._log)


def _onnx_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "config.json")


@contextlib.contextmanager
def _patched_unet_attention_fusion() -> Iterator[None]:
    """ORT's FusionAttentionUnet.get_num_heads calls int() on a 1-element array, a TypeError with numpy >= 2
    (seen with numpy 2.4 and onnxruntime 1.32). Same logic with ``.item()``, only for this call."""
    import sys

    import numpy as np
    from onnxruntime.transformers import optimizer  # noqa: F401  (puts its folder on sys.path)

    # onnxruntime.transformers imports its modules both as a package and top-level (sys.path): patch both.
    classes = {
        mod.FusionAttentionUnet
        for name in ("fusion_attention_unet", "onnxruntime.transformers.fusion_attention_unet")
        if (mod := sys.modules.get(name)) is not None
    }

    def get_num_heads(self, reshape_q, is_torch2: bool = False) -> int:
        num_heads = 0
        if is_torch2:
            parent = self.model.get_parent(reshape_q, 1)
            if parent and parent.op_type == "Concat" and len(parent.input) == 4:
                value = self.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1:
                    num_heads = int(value.reshape(-1)[0].item())
        else:
            value = self.model.get_constant_value(reshape_q.input[1])
            if isinstance(value, np.ndarray) and list(value.shape) == [4]:
                num_heads = int(value[2].item())
        return num_heads if num_heads > 0 else 0

    originals = {cls: cls.get_num_heads for cls in classes}
    for cls in classes:
        cls.get_num_heads = get_num_heads
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.get_num_heads = original


def _optimize_graph(path: Path, name: str, target: str, fp16: bool) -> dict[str, int]:
    """ONNX Runtime's SD fusions on one graph, in place. Returns the fused-op counts."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = _ORT_MODEL_TYPE[name]
    options = FusionOptions(model_type)
    if model_type == "unet":  # as optimize_pipeline.py: packed KV/QKV only for fp16
        options.enable_packed_kv = fp16 and options.enable_packed_kv
        options.enable_packed_qkv = fp16 and options.enable_packed_qkv
    if (
        model_type == "unet"
        and target == "gpu"
        and not _bias_split_gelu_supported(path.parent / "config.json")
    ):
        options.enable_bias_splitgelu = False  # its CUDA kernel takes SD's widths only
    if target == "cpu":
        for flag in _GPU_ONLY_FUSIONS:
            if hasattr(options, flag):
                setattr(options, flag, False)
        options.enable_bias_add = False
    with _patched_unet_attention_fusion():
        model = optimize_model(
            str(path),
            model_type=model_type,
            num_heads=0,
            hidden_size=0,
            opt_level=0,
            optimization_options=options,
            use_gpu=target == "gpu",
        )
    counts = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
    model.save_model_to_file(str(path), use_external_data_format=_has_external_data(path))
    return counts


# Input widths (2 x the GEGLU inner width = 8 x channels) ONNX Runtime's BiasSplitGelu CUDA kernel takes;
# others fail at run time ("hidden size should be 2560, 5120, 6144, 10240 or 12288").
_BIAS_SPLIT_GELU_WIDTHS = {2560, 5120, 6144, 10240, 12288}


def _bias_split_gelu_supported(unet_config: Path) -> bool:
    """True when every transformer block's GEGLU width suits the fused kernel (SD2.1: 320/640/1280 channels)."""
    try:
        channels = json.loads(unet_config.read_text())["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all(8 * int(c) in _BIAS_SPLIT_GELU_WIDTHS for c in channels)


def _has_external_data(path: Path) -> bool:
    return any(p.name != path.name and p.name != "config.json" for p in path.parent.iterdir())


def _fp32_attention_nodes(model) -> list[str]:
    """Nodes of the attention score path (Q.K^T, scale, Softmax, .V): inside an attention module, not one
    of its q/k/v/out projections. Works on optimum's TorchScript node names (``.../attn1/MatMul``)."""
    keep = []
    for node in model.graph.node:
        name = node.name
        vae_mid_attention = (
            "/attentions." in name and "mid_block" in name and "/transformer_blocks." not in name
        )
        in_attention = "/attn1/" in name or "/attn2/" in name or vae_mid_attention
        projection = any(p in name for p in ("/to_q/", "/to_k/", "/to_v/", "/to_out", "/group_norm/"))
        if in_attention and not projection and node.op_type in ("MatMul", "Mul", "Div", "Softmax"):
            keep.append(name)
    return keep


def _to_fp16(path: Path, name: str) -> list[str]:
    """Convert one graph to float16 in place (float32 inputs/outputs). Returns what was kept in float32."""
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(path)))
    keep = _fp32_attention_nodes(model.model) if name in ("unet", "vae_decoder", "vae_encoder") else []
    model.convert_float_to_float16(
        keep_io_types=True, node_block_list=keep, op_block_list=["RandomNormalLike"]
    )
    dropped = _drop_duplicate_nodes(model.model.graph)
    if dropped:
        logger.info("%s: removed %d duplicate Cast nodes left by the float16 converter", name, dropped)
    model.save_model_to_file(str(path), use_external_data_format=_has_external_data(path))
    return [f"{len(keep)} attention score-path nodes (MatMul/Mul/Div/Softmax)"] if keep else []


def _drop_duplicate_nodes(graph) -> int:
    """Remove exact duplicates (same name, op, inputs and outputs) and their duplicate value_info.

    onnxruntime < 1.32's float16 converter inserts one ``<tensor>_cast_to_fp32_node`` Cast per blocked
    consumer of a float16 tensor, all with the same name and output; ONNX Runtime 1.30 then refuses the
    graph ("two nodes with same node name"), seen on CUDA by bench/gpu_check.py. Returns how many went."""
    seen: set[tuple] = set()
    keep = []
    for node in graph.node:
        key = (node.name, node.op_type, node.domain, tuple(node.input), tuple(node.output))
        if node.name and key in seen:
            continue
        seen.add(key)
        keep.append(node)
    dropped = len(graph.node) - len(keep)
    if dropped:
        del graph.node[:]
        graph.node.extend(keep)
        names: set[str] = set()
        infos = []
        for info in graph.value_info:
            if info.name not in names:
                names.add(info.name)
                infos.append(info)
        del graph.value_info[:]
        graph.value_info.extend(infos)
    return dropped


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _torch_reference(pipe, name: str, feeds: dict[str, Any]) -> dict[str, Any]:
    import torch

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if name == "text_encoder":
            out = pipe.text_encoder(t["input_ids"])
            return {
                "last_hidden_state": out.last_hidden_state.numpy(),
                "pooler_output": out.pooler_output.numpy(),
            }
        if name == "unet":
            out = pipe.unet(t["sample"], t["timestep"], t["encoder_hidden_states"]).sample
            return {"out_sample": out.numpy()}
        if name == "vae_decoder":
            return {"sample": pipe.vae.decode(t["latent_sample"]).sample.numpy()}
        if name == "vae_encoder":
            dist = pipe.vae.encode(t["sample"]).latent_dist
            return {"latent_parameters": dist.parameters.numpy()}
    raise KeyError(name)


def _validate_graph(
    pipe, spec: GraphSpec, path: Path, report: GraphReport, size: tuple[int, int], fp16: bool
) -> tuple[list[OutputMismatch], list[str]]:
    """Spec check + torch vs ORT at batch 1 and 2 (classifier-free guidance runs batch 2)."""
    problems = spec.check_graph(path)
    try:
        session = _ort_session(path)
    except Exception as exc:
        ops = _gpu_only_ops(path)
        why = f"ONNX Runtime CPU cannot run it ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        if ops:
            why = f"CUDA-only fused ops {sorted(ops)}; " + why
        if not (ops or fp16):
            raise
        report.not_validated_reason = why
        return [], problems
    text = pipe.text_encoder.config
    w, h = size
    dims = {
        "sequence_length": pipe.tokenizer.model_max_length,
        "vocab": text.vocab_size,
        "height": h // 8,
        "width": w // 8,
        "latent_height": h // 8,
        "latent_width": w // 8,
        "image_height": h,
        "image_width": w,
    }
    static = {"encoder_hidden_states.2": text.hidden_size}
    failures: list[OutputMismatch] = []
    diffs: dict[str, float] = {}
    atol = spec.fp16_atol if fp16 else spec.atol
    for batch in (1, 2):
        feeds = spec.dummy_inputs({**dims, "batch_size": batch}, static, seed=batch)
        ort_out = dict(zip(spec.output_names, session.run(spec.output_names, feeds), strict=True))
        ref = _torch_reference(pipe, spec.name, feeds)
        case = f"batch={batch} {w}x{h}"
        failures += compare_outputs(spec.name, case, ref, ort_out, atol, spec.rtol, diffs)
    report.max_abs_diff = {k.split(".", 1)[1]: v for k, v in diffs.items()}
    report.validated = not failures and not problems
    return failures, problems


def _gpu_only_ops(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {n.op_type for n in model.graph.node if n.op_type in _GPU_ONLY_OPS}


def _validate_pipeline(pipe, bundle: Path, config: EdgeExportConfig, size: tuple[int, int]) -> float:
    """Torch pipeline vs ORTStableDiffusionPipeline from the bundle, same prompt, seed-fixed latents."""
    import numpy as np
    import torch
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    w, h = size
    ort_pipe = ORTStableDiffusionPipeline.from_pretrained(bundle, provider="CPUExecutionProvider")
    latents = np.random.default_rng(0).standard_normal((1, 4, h // 8, w // 8)).astype(np.float32)
    images = []
    for p in (pipe, ort_pipe):
        p.set_progress_bar_config(disable=True)
        images.append(
            p(
                "a red fox in the snow",
                num_inference_steps=config.validate_steps,
                height=h,
                width=w,
                latents=torch.from_numpy(latents.copy()),
                output_type="np",
            ).images
        )
    a, b = (np.asarray(x, dtype=np.float64) for x in images)
    if a.shape != b.shape or not np.isfinite(b).all():
        return float("inf")
    return float(np.abs(a - b).max())


def _write_fast_tokenizer(pipeline_tok: Path | None, bundle_tok: Path) -> None:
    """``tokenizer/tokenizer.json`` for the torch-free runtime, checked against the slow tokenizer."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    target = bundle_tok / "tokenizer.json"
    if pipeline_tok is not None and (pipeline_tok / "tokenizer.json").is_file():
        shutil.copyfile(pipeline_tok / "tokenizer.json", target)
    else:
        CLIPTokenizerFast.from_pretrained(bundle_tok, from_slow=True).backend_tokenizer.save(str(target))
    from tokenizers import Tokenizer

    fast, slow = Tokenizer.from_file(str(target)), CLIPTokenizer.from_pretrained(bundle_tok)
    for prompt in ("a red fox in the snow", "An astronaut riding a horse, 4k!!", ""):
        if fast.encode(prompt).ids != slow(prompt).input_ids:
            raise ExportValidationError(
                "tokenizer", [], [f"tokenizer.json ids differ from CLIPTokenizer on {prompt!r}"]
            )


def export_edge(config: EdgeExportConfig) -> EdgeExportResult:
    """Export, optimize/convert, validate and write the bundle (see the module docstring)."""
    start = time.perf_counter()
    if config.optimize_target not in ("gpu", "cpu"):
        raise UsageError(f"--optimize-target {config.optimize_target!r}: allowed gpu, cpu")
    if config.validate_steps < 1:
        raise UsageError(f"--validate-steps {config.validate_steps}: must be >= 1")
    out = Path(config.out)
    _check_out(out, config.force)
    sign_key = None
    if config.sign_key is not None:  # read before the export: a bad key fails in one line, at once
        from routet2i.signing import load_private_key

        sign_key = load_private_key(config.sign_key)
    unet_config = check_sd21_shaped(config.pipeline)
    sizes = config.sizes
    size = config.validate_size or (min(sizes, key=lambda s: s[0] * s[1]) if sizes else (64, 64))
    if sizes and size not in sizes:
        raise UsageError(f"--validate-size {size[0]}x{size[1]}: not one of --sizes")

    import torch
    from diffusers import StableDiffusionPipeline
    from optimum.exporters.onnx import main_export

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    result = EdgeExportResult(bundle=out)
    try:
        _say("1/6 export", f"{config.pipeline} -> ONNX with optimum-onnx (opset {config.opset}, fp32)")
        t0 = time.perf_counter()
        main_export(
            config.pipeline,
            tmp,
            task="text-to-image",
            opset=config.opset,
            do_validation=False,  # validated below, graph by graph and as a pipeline
            library_name="diffusers",
        )
        if not config.vae_encoder and (tmp / "vae_encoder").exists():
            shutil.rmtree(tmp / "vae_encoder")
        graphs = [n for n in EDGE_GRAPHS if (tmp / n / "model.onnx").is_file()]
        for name in graphs:
            result.graphs[name] = GraphReport(name=name, bytes=_onnx_bytes(tmp / name))
            _say("1/6 export", f"{name}/model.onnx {result.graphs[name].bytes / 1e6:.1f} MB")
        _say("1/6 export", f"done in {time.perf_counter() - t0:.1f}s")

        if config.optimize:
            _say("2/6 optimize", f"ONNX Runtime SD fusions (target {config.optimize_target})")
            for name in graphs:
                t0 = time.perf_counter()
                counts = _optimize_graph(tmp / name / "model.onnx", name, config.optimize_target, config.fp16)
                result.graphs[name].fused_ops = counts
                _say("2/6 optimize", f"{name}: {counts or 'no fusions'} ({time.perf_counter() - t0:.1f}s)")
        else:
            _say("2/6 optimize", "skipped (no --optimize)")

        if config.fp16:
            _say("3/6 fp16", "float16 weights/compute, float32 inputs/outputs")
            for name in graphs:
                kept = _to_fp16(tmp / name / "model.onnx", name)
                result.graphs[name].dtype = "float16"
                result.graphs[name].fp32_kept = kept
                _say("3/6 fp16", f"{name}: kept float32: {kept or 'nothing'}")
        else:
            _say("3/6 fp16", "skipped (no --fp16)")

        tok = Path(config.pipeline) / "tokenizer" if Path(config.pipeline).is_dir() else None
        _write_fast_tokenizer(tok, tmp / "tokenizer")

        _say(
            "4/6 validate graphs", f"spec + torch vs ONNX Runtime (CPU) at {size[0]}x{size[1]}, batch 1 and 2"
        )
        pipe = StableDiffusionPipeline.from_pretrained(config.pipeline, torch_dtype=torch.float32)
        failures: list[OutputMismatch] = []
        problems: list[str] = []
        for name in graphs:
            report = result.graphs[name]
            report.bytes = _onnx_bytes(tmp / name)
            f, p = _validate_graph(
                pipe, EDGE_GRAPHS[name], tmp / name / "model.onnx", report, size, config.fp16
            )
            failures += f
            problems += p
            state = "ok" if report.validated else report.not_validated_reason or "FAILED"
            diffs = ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_diff.items())
            _say("4/6 validate graphs", f"{name}: {state} (max abs diff: {diffs or '-'})")
        if failures or problems:
            raise ExportValidationError(f"export edge {config.pipeline}", failures, problems)

        if all(result.graphs[n].validated for n in graphs):
            _say(
                "5/6 validate pipeline",
                f"torch vs ORT pipeline, {config.validate_steps} steps, fixed latents",
            )
            diff = _validate_pipeline(pipe, tmp, config, size)
            atol = 0.1 if config.fp16 else config.pipeline_atol
            result.pipeline_max_abs_diff = diff
            _say("5/6 validate pipeline", f"max abs diff on [0,1] images {diff:.2e} (bound {atol:g})")
            if not diff <= atol:
                raise ExportValidationError(
                    f"export edge {config.pipeline}",
                    [OutputMismatch("pipeline", "images", f"{size[0]}x{size[1]}", diff, atol)],
                )
            result.pipeline_validated = True
        else:
            _say("5/6 validate pipeline", "skipped: some graphs cannot run on ONNX Runtime CPU (see above)")

        extra = {
            "edge": {
                "source": config.pipeline,
                "opset": config.opset,
                "dtype": "float16" if config.fp16 else "float32",
                "io_dtype": "float32",
                "optimized": config.optimize,
                "optimize_target": config.optimize_target if config.optimize else None,
                "execution": "gpu"
                if config.fp16 or (config.optimize and config.optimize_target == "gpu")
                else "any",
                "prediction_type": pipe.scheduler.config.get("prediction_type"),
                "upcast_attention": bool(unet_config.get("upcast_attention", False)),
                "image_size": {
                    "multiple_of": SIZE_MULTIPLE,
                    "min": SIZE_MULTIPLE,
                    "max": config.max_side if sizes is None else max(max(s) for s in sizes),
                    "default": [unet_config.get("sample_size", 64) * 8] * 2,
                    "allowed": [list(s) for s in sizes] if sizes else None,
                },
                "graphs": {n: r.as_dict() for n, r in result.graphs.items()},
                "validation": {
                    "size": list(size),
                    "batches": [1, 2],
                    "graphs_validated": [n for n in graphs if result.graphs[n].validated],
                    "graphs_not_validated": {
                        n: result.graphs[n].not_validated_reason
                        for n in graphs
                        if not result.graphs[n].validated
                    },
                    "pipeline_steps": config.validate_steps,
                    "pipeline_max_abs_diff": result.pipeline_max_abs_diff,
                    "pipeline_validated": result.pipeline_validated,
                    "tokenizer_json_matches_slow": True,
                    "provider": "CPUExecutionProvider",
                },
            }
        }
        _say("6/6 manifest", "sha256 of every file" + (", signed" if sign_key is not None else ""))
        from routet2i.bundle import write_manifest

        result.manifest = write_manifest(tmp, kind="edge", extra=extra, sign_key=sign_key)
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.seconds = time.perf_counter() - start
    _summary(result)
    return result


def _summary(result: EdgeExportResult) -> None:
    lines = [f"[export edge] bundle {result.bundle} ({result.seconds:.1f}s)"]
    for r in result.graphs.values():
        diff = max(r.max_abs_diff.values(), default=float("nan"))
        state = "validated" if r.validated else f"NOT validated: {r.not_validated_reason}"
        lines.append(f"  {r.name:<13} {r.bytes / 1e6:8.1f} MB  {r.dtype:<8} max abs diff {diff:.1e}  {state}")
    if result.pipeline_validated:
        lines.append(f"  pipeline: torch vs ORT max abs diff {result.pipeline_max_abs_diff:.2e}")
    else:
        lines.append("  pipeline: NOT validated on this machine")
    logger.info("%s", "\n".join(lines))


# ------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="SD2.1-shaped diffusers folder or Hugging Face id")
    parser.add_argument("--out", required=True, type=Path, help="bundle folder to create")
    parser.add_argument("--fp16", action="store_true", help="float16 for GPU providers (attention kept fp32)")
    parser.add_argument("--optimize", action="store_true", help="ONNX Runtime Stable Diffusion fusions")
    parser.add_argument(
        "--optimize-target",
        choices=("gpu", "cpu"),
        default="gpu",
        help="gpu: all fusions (CUDA-only ops, not validated on CPU); cpu: CUDA-only fusions off",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument(
        "--sizes",
        nargs="+",
        metavar="WxH",
        help="allowed image sizes (multiples of 64); default: any up to --max-side",
    )
    parser.add_argument("--max-side", type=int, default=1024, help="largest width/height without --sizes")
    parser.add_argument("--no-vae-encoder", action="store_true", help="drop the VAE encoder (img2img only)")
    parser.add_argument(
        "--validate-size", metavar="WxH", help="size of the validation runs (default smallest)"
    )
    parser.add_argument("--validate-steps", type=int, default=2, help="steps of the pipeline validation")
    parser.add_argument(
        "--sign-key", type=Path, help="Ed25519 private key (PEM) to sign the manifest (routet2i dev keygen)"
    )


def run(args: argparse.Namespace) -> int:
    sizes = [parse_size(s) for s in args.sizes] if args.sizes else None
    if args.max_side < SIZE_MULTIPLE or args.max_side % SIZE_MULTIPLE:
        raise UsageError(f"--max-side {args.max_side}: must be a positive multiple of {SIZE_MULTIPLE}")
    config = EdgeExportConfig(
        pipeline=args.pipeline,
        out=args.out,
        fp16=args.fp16,
        optimize=args.optimize,
        optimize_target=args.optimize_target,
        force=args.force,
        sizes=sizes,
        max_side=args.max_side,
        vae_encoder=not args.no_vae_encoder,
        validate_steps=args.validate_steps,
        validate_size=parse_size(args.validate_size, "--validate-size") if args.validate_size else None,
        sign_key=args.sign_key,
    )
    try:
        with cli_progress():
            export_edge(config)
    except ExportValidationError as exc:
        print(f"routet2i export edge: error: {exc}")
        return 1
    return 0
