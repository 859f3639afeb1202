"""The torch-free on-device Stable Diffusion 2.1 pipeline: ONNX Runtime + numpy schedulers + `tokenizers`.

Loads an edge bundle (the optimum-onnx Stable Diffusion layout written by ``routet2i export edge``:
``text_encoder/model.onnx``, ``unet/model.onnx``, ``vae_decoder/model.onnx``, ``tokenizer/``,
``scheduler/scheduler_config.json``, ``model_index.json`` and ``manifest.json``) after verifying its
manifest, and generates as diffusers' ``StableDiffusionPipeline`` does: the prompt and the negative prompt
encoded by the text encoder, classifier-free guidance with the unconditional and conditional passes batched
in one UNet call, the scheduler stepping the latents, the VAE decoding them. Given the same initial latents
it reproduces optimum's ``ORTStableDiffusionPipeline`` (tested). The seed draws the initial latents with
numpy (``np.random.default_rng(seed)``): deterministic here, but not torch's random stream.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from routet2i._errors import BundleError, BundleFileMissing, UsageError
from routet2i.bundle import read_json_object, verify_bundle
from routet2i.ort import (
    OrtModel,
    ProviderSpec,
    SessionConfig,
    available_providers,
    provider_name,
    resolve_providers,
)
from routet2i.progress import ProgressEvent
from routet2i.schedulers import Scheduler, load_scheduler_config, scheduler_from_config
from routet2i.seed import SEED_MAX, check_seed

logger = logging.getLogger(__name__)

__all__ = ["EdgePipeline", "SizeRule", "MAX_STEPS", "load_clip_tokenizer"]

MAX_STEPS = 1000  # num_inference_steps upper bound (the schedules are 1000 training steps long)
MAX_IMAGES = 64  # num_images_per_prompt upper bound (one after the other: time, not memory)
REQUIRED_FILES = (
    "model_index.json",
    "text_encoder/model.onnx",
    "unet/model.onnx",
    "vae_decoder/model.onnx",
    "scheduler/scheduler_config.json",
)
_CPU_ONLY = {"CPUExecutionProvider"}
ProgressCallback = Callable[[int, int, Any, np.ndarray], None]


# --------------------------------------------------------------------------------------------- tokenizer


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_clip_tokenizer(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """A `tokenizers.Tokenizer` for a CLIP tokenizer folder, and its settings (max_length, pad/bos/eos).

    Uses ``tokenizer.json`` when the folder has one; otherwise builds the same fast tokenizer from
    ``vocab.json`` + ``merges.txt`` as transformers' ``CLIPConverter`` does (the hub's SD2.1 and optimum's
    export ship only those), so no transformers import is needed."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    folder = Path(folder)
    cfg: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            cfg.update(read_json_object(folder / name))
    bos = _token_str(cfg.get("bos_token")) or "<|startoftext|>"
    eos = _token_str(cfg.get("eos_token")) or "<|endoftext|>"
    pad = _token_str(cfg.get("pad_token")) or eos
    unk = _token_str(cfg.get("unk_token")) or eos
    max_length = int(cfg.get("model_max_length") or 77)
    if max_length > 100_000:  # transformers' "no limit" sentinel
        max_length = 77
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise BundleFileMissing(
                    f"{p}: tokenizer file missing (need tokenizer.json or vocab.json+merges.txt)"
                )
        vocab = read_json_object(vocab_path)
        merges = []
        for line in merges_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#version") or not line.strip():
                continue
            a, b = line.split()
            merges.append((a, b))
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
                unk_token=unk,
            )
        )
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(
                    Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                    behavior="removed",
                    invert=True,
                ),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing(
            sep=(eos, vocab[eos]), cls=(bos, vocab[bos]), add_prefix_space=False, trim_offsets=False
        )
        # Added tokens split the text as in transformers (SD2.1's pad token "!" is one: "hi!" -> hi, !).
        added = []
        for token_id, entry in sorted(cfg.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0])):
            if vocab.get(entry.get("content")) != int(token_id):
                raise BundleError(f"{folder}: added token {entry!r} does not match vocab.json")
            added.append(
                AddedToken(
                    entry["content"],
                    single_word=entry.get("single_word", False),
                    lstrip=entry.get("lstrip", False),
                    rstrip=entry.get("rstrip", False),
                    normalized=entry.get("normalized", True),
                    special=entry.get("special", True),
                )
            )
        if added:
            tok.add_special_tokens(added)
    tok.no_truncation()
    tok.no_padding()
    ids = {}
    for role, token in (("bos", bos), ("eos", eos), ("pad", pad)):
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise BundleError(f"{folder}: {role} token {token!r} is not in the tokenizer's vocabulary")
        ids[role] = token_id
    return tok, {"max_length": max_length, "bos_id": ids["bos"], "eos_id": ids["eos"], "pad_id": ids["pad"]}


# ------------------------------------------------------------------------------------------------- model


def _model_name(manifest: dict[str, Any], model_index: dict[str, Any], root: Path) -> str:
    """The edge model's name: what ``routet2i export edge`` exported (the manifest's ``edge.source``: a hub
    id such as ``stabilityai/stable-diffusion-2-1-base`` as given, a local folder by its name), else
    ``model_index.json``'s ``_name_or_path``, else the bundle folder's name."""
    edge = manifest.get("edge") if isinstance(manifest.get("edge"), dict) else {}
    for source in (edge.get("source"), model_index.get("_name_or_path")):
        if isinstance(source, str) and source.strip():
            source = source.strip().rstrip("/\\")
            if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source):  # not a hub id: a local path
                source = re.split(r"[/\\]", source)[-1]
            if source:
                return source
    return root.resolve().name


# ------------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class SizeRule:
    """Which image sizes the bundle's UNet was exported and validated for."""

    multiple_of: int = 64  # width and height must be multiples of this (the exported UNet's constraint)
    min_size: int = 64  # smallest side in pixels
    max_size: int = 1024  # largest side in pixels
    sizes: tuple[tuple[int, int], ...] | None = None  # an explicit list of (width, height) pairs, if any

    def allows(self, width: int, height: int) -> bool:
        if self.sizes is not None:
            return (width, height) in self.sizes
        return all(self.min_size <= v <= self.max_size and v % self.multiple_of == 0 for v in (width, height))

    def describe(self) -> str:
        if self.sizes is not None:
            return "one of " + ", ".join(f"{w}x{h}" for w, h in self.sizes)
        return f"multiples of {self.multiple_of} in [{self.min_size}, {self.max_size}]"

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], default_size: int, where: Path) -> SizeRule:
        """Read the sizes ``routet2i export edge`` records: ``edge.image_size`` = {multiple_of, min, max,
        allowed: [[w, h], ...] | null} (a top-level ``allowed_sizes`` of the same forms is accepted too).
        Absent (a bundle made by other tools): multiples of 64 from 64 to twice the model's default size."""
        edge = manifest.get("edge") if isinstance(manifest.get("edge"), dict) else {}
        spec = edge.get("image_size", manifest.get("allowed_sizes"))
        if spec is None:
            logger.info(
                "%s records no allowed sizes: allowing multiples of 64 up to %d", where, 2 * default_size
            )
            return cls(64, 64, max(64, 2 * default_size))
        try:
            if isinstance(spec, list):
                return cls(sizes=tuple((int(p[0]), int(p[1])) for p in spec))
            if isinstance(spec, dict):
                pairs = spec.get("allowed", spec.get("sizes"))
                if pairs:
                    return cls(sizes=tuple((int(p[0]), int(p[1])) for p in pairs))
                return cls(
                    int(spec.get("multiple_of", 64)),
                    int(spec.get("min", spec.get("min_size", 64))),
                    int(spec.get("max", spec.get("max_size", 2 * default_size))),
                )
        except (TypeError, ValueError, IndexError):
            pass
        raise BundleError(
            f"{where}: image sizes {spec!r} are neither [[w, h], ...] nor {{multiple_of, min, max, allowed}}"
        )


# ---------------------------------------------------------------------------------------------- pipeline


class EdgePipeline:
    """Stable Diffusion (2.1 layout) on ONNX Runtime, without torch.

    ``EdgePipeline(bundle_dir)(prompt) -> PIL.Image``. Sessions are created once, here.

    Args:
        bundle_dir: the edge bundle folder.
        providers: ONNX Runtime providers (see `routet2i.ort.resolve_providers`); None: TensorRT -> CUDA -> CPU.
        scheduler: None (the bundle's ``scheduler_config.json``), a name (``"ddim"``, ``"euler"``,
            ``"dpm++"`` or a diffusers class name: built from the bundle's config, as diffusers'
            ``from_config`` swap does) or a ready scheduler object.
        session_config: ONNX Runtime session options.
        check_hashes: sha256 of the files against the manifest: "first" (default: a file is hashed again
            only when its stamp changed since it last matched; the hash cache lives in ``cache_dir``),
            "always", or "never" (sizes only). True/False mean "always"/"never".
        trusted_keys: Ed25519 public-key PEM files (or PEM text); when given, the bundle's ``manifest.sig``
            must verify with one of them (checked at every load, whatever ``check_hashes`` says).
        cache_dir: the per-user cache folder (default `routet2i.paths.user_cache_dir`).
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        providers: str | Sequence[ProviderSpec] | None = None,
        scheduler: str | Scheduler | None = None,
        session_config: SessionConfig | None = None,
        check_hashes: bool | str = "first",
        trusted_keys: Sequence[str | os.PathLike[str]] | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        t0 = time.perf_counter()
        self.bundle_dir = root = Path(bundle_dir)
        self.check = verify_bundle(
            root, kind="edge", check_hashes=check_hashes, trusted_keys=trusted_keys, cache_dir=cache_dir
        )
        self.manifest = self.check.manifest
        # Seconds per start-up step (verify, prepare: configs + tokenizer, sessions, session_<graph>).
        self.timings: dict[str, float] = {"verify": self.check.seconds}
        for rel in REQUIRED_FILES:
            if not (root / rel).is_file():
                raise BundleFileMissing(f"{root / rel}: required by an edge bundle but missing")
        self.model_index = read_json_object(root / "model_index.json")
        self.model_name = _model_name(self.manifest, self.model_index, root)
        self.scheduler_config = load_scheduler_config(root / "scheduler" / "scheduler_config.json")
        self.scheduler_spec = scheduler
        self.scheduler = self._make_scheduler(scheduler)  # validates the name now, not at first call
        unet_cfg = (
            read_json_object(root / "unet" / "config.json")
            if (root / "unet" / "config.json").is_file()
            else {}
        )
        vae_cfg = (
            read_json_object(root / "vae_decoder" / "config.json")
            if (root / "vae_decoder" / "config.json").is_file()
            else {}
        )
        self.vae_scale_factor = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
        self.vae_scaling_factor = float(vae_cfg.get("scaling_factor", 0.18215))
        self.default_size = int(unet_cfg.get("sample_size", 64)) * self.vae_scale_factor
        if unet_cfg.get("time_cond_proj_dim") is not None:
            raise BundleError(f"{root / 'unet/config.json'}: guidance-embedded (LCM) UNets are not supported")
        self.size_rule = SizeRule.from_manifest(self.manifest, self.default_size, root / "manifest.json")

        self.tokenizer, tok_info = load_clip_tokenizer(root / "tokenizer")
        self.max_length: int = tok_info["max_length"]
        self._pad_id, self._bos_id, self._eos_id = tok_info["pad_id"], tok_info["bos_id"], tok_info["eos_id"]

        cfg = session_config or SessionConfig()
        edge_info = self.manifest.get("edge") if isinstance(self.manifest.get("edge"), dict) else {}
        if (
            edge_info.get("execution") == "gpu"
            and provider_name(resolve_providers(providers)[0]) in _CPU_ONLY
        ):
            raise BundleError(
                f"{root / 'manifest.json'}: this bundle was exported for GPU execution providers "
                f"(dtype {edge_info.get('dtype')}, optimized {edge_info.get('optimize_target')}) and cannot run "
                f"on {available_providers()}; export it without --fp16 and with --optimize-target cpu"
            )
        self._providers_spec, self._session_config, self._cache_dir = providers, cfg, cache_dir
        self.timings["prepare"] = time.perf_counter() - t0 - self.timings["verify"]
        t1 = time.perf_counter()
        # The three sessions at once (ONNX Runtime releases the GIL while it builds one); the VAE encoder
        # only when an image input needs it (`vae_encoder`).
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="routet2i-load") as pool:
            futures = {
                name: pool.submit(self._load_graph, name) for name in ("text_encoder", "unet", "vae_decoder")
            }
            models = {name: f.result() for name, f in futures.items()}
        self.text_encoder, self.unet, self.vae_decoder = (
            models["text_encoder"],
            models["unet"],
            models["vae_decoder"],
        )
        self._vae_encoder: OrtModel | None = None
        self.timings["sessions"] = time.perf_counter() - t1
        for name, model in models.items():
            self.timings[f"session_{name}"] = model.load_seconds
        for model, names in (
            (self.text_encoder, {"input_ids"}),
            (self.unet, {"sample", "timestep", "encoder_hidden_states"}),
            (self.vae_decoder, {"latent_sample"}),
        ):
            if not names <= set(model.input_types):
                raise BundleError(
                    f"{model.path}: inputs {sorted(model.input_types)} lack {sorted(names - set(model.input_types))}"
                )
        self.providers = self.unet.providers
        self._latent_dtype = self.unet.input_types["sample"]
        self._timestep_rank = len(self.unet.input_shapes["timestep"])
        outs = self.unet.output_names
        self._unet_out = "out_sample" if "out_sample" in outs else outs[0]
        outs = self.vae_decoder.output_names
        self._vae_out = "sample" if "sample" in outs else outs[0]
        self.latent_channels = int(unet_cfg.get("in_channels", 4))
        self.timings["ready"] = time.perf_counter() - t0
        logger.info(
            "EdgePipeline ready in %.2fs: %s, providers %s, scheduler %s, default size %d; steps %s",
            self.timings["ready"],
            root,
            self.providers,
            type(self.scheduler).__name__,
            self.default_size,
            {k: round(v, 3) for k, v in self.timings.items()},
        )

    def _load_graph(self, name: str) -> OrtModel:
        rel = f"{name}/model.onnx"
        return OrtModel(
            self.bundle_dir / rel,
            self._providers_spec,
            self._session_config,
            cache_dir=self._cache_dir,
            cache_key=f"{self.check.manifest_sha256}:{rel}",
        )

    @property
    def vae_encoder(self) -> OrtModel:
        """The VAE encoder's session (image -> latent distribution), created on first use: text-to-image
        never needs it, so a launch does not pay for it. BundleFileMissing when the bundle has none
        (exported with ``--no-vae-encoder``)."""
        if self._vae_encoder is None:
            path = self.bundle_dir / "vae_encoder" / "model.onnx"
            if not path.is_file():
                raise BundleFileMissing(
                    f"{path}: this bundle has no VAE encoder (exported with --no-vae-encoder)"
                )
            self._vae_encoder = self._load_graph("vae_encoder")
        return self._vae_encoder

    # ------------------------------------------------------------------------------------------ helpers

    def _make_scheduler(self, spec: str | Scheduler | None) -> Scheduler:
        if spec is None:
            return scheduler_from_config(self.scheduler_config)
        if isinstance(spec, str):
            return scheduler_from_config(self.scheduler_config, name=spec)
        if not all(hasattr(spec, a) for a in ("set_timesteps", "step", "scale_model_input", "timesteps")):
            raise UsageError(
                f"scheduler={spec!r}: expected a name (ddim, euler, dpm++) or a scheduler object"
            )
        return spec

    def _fresh_scheduler(self) -> Scheduler:
        """A scheduler with no state left from a previous call (multistep ones keep history)."""
        if self.scheduler_spec is None or isinstance(self.scheduler_spec, str):
            return self._make_scheduler(self.scheduler_spec)
        return self.scheduler

    def tokenize(self, text: str, argument: str = "prompt") -> np.ndarray:
        """CLIP ids [1, max_length]: bos + tokens + eos, padded; truncated with a warning as diffusers does."""
        ids = self.tokenizer.encode(text).ids
        if ids[:1] == [self._bos_id]:
            ids = ids[1:]
        if ids[-1:] == [self._eos_id]:
            ids = ids[:-1]
        room = self.max_length - 2
        if len(ids) > room:
            removed = self.tokenizer.decode(ids[room:])
            logger.warning(
                "%s: the following part of your input was truncated because CLIP can only handle sequences "
                "up to %d tokens: %s",
                argument,
                self.max_length,
                removed,
            )
            ids = ids[:room]
        ids = [self._bos_id, *ids, self._eos_id]
        ids += [self._pad_id] * (self.max_length - len(ids))
        return np.asarray([ids], dtype=np.int64)

    def encode_prompt(self, prompt: str, negative_prompt: str | None, guidance: bool) -> np.ndarray:
        """Text embeddings [2 or 1, max_length, hidden]: unconditional first (diffusers' order)."""
        rows = [self.tokenize(prompt, "prompt")]
        if guidance:
            rows.insert(0, self.tokenize(negative_prompt or "", "negative_prompt"))
        ids = np.concatenate(rows, axis=0)
        out = self.text_encoder(input_ids=ids)
        key = "last_hidden_state" if "last_hidden_state" in out else self.text_encoder.output_names[0]
        return out[key]

    def _check_inputs(
        self,
        prompt: Any,
        negative_prompt: Any,
        num_inference_steps: Any,
        guidance_scale: Any,
        width: int,
        height: int,
        seed: Any,
        latents: Any,
        callback: Any,
    ) -> None:
        if not isinstance(prompt, str):
            raise UsageError(f"prompt={prompt!r}: must be a string")
        if not prompt.strip():
            raise UsageError("prompt='': must be a non-empty string")
        if negative_prompt is not None and not isinstance(negative_prompt, str):
            raise UsageError(f"negative_prompt={negative_prompt!r}: must be a string or None")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
            raise UsageError(
                f"num_inference_steps={num_inference_steps!r}: must be an integer in [1, {MAX_STEPS}]"
            )
        if not 1 <= num_inference_steps <= MAX_STEPS:
            raise UsageError(
                f"num_inference_steps={num_inference_steps}: out of range; allowed: [1, {MAX_STEPS}]"
            )
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, numbers.Real)
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise UsageError(
                f"guidance_scale={guidance_scale!r}: must be a finite number >= 0 (1 or less: no guidance)"
            )
        for name, value in (("width", width), ("height", height)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise UsageError(
                    f"{name}={value!r}: must be an integer; allowed: {self.size_rule.describe()}"
                )
        if not self.size_rule.allows(int(width), int(height)):
            raise UsageError(
                f"width={width}, height={height}: size not allowed by this bundle; allowed: {self.size_rule.describe()}"
            )
        check_seed(seed)  # [0, 2**64 - 1]: the bound the client and the cloud use (routet2i.seed)
        if latents is not None:
            shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            if not isinstance(latents, np.ndarray) or tuple(latents.shape) != shape:
                got = getattr(latents, "shape", type(latents).__name__)
                raise UsageError(
                    f"latents: shape {got}; expected a numpy array of shape {shape} for {width}x{height}"
                )
            if not np.isfinite(latents).all():
                raise UsageError("latents: contain NaN or infinite values")
        if callback is not None and not callable(callback):
            raise UsageError(
                f"callback={callback!r}: must be callable (step, total_steps, timestep, latents)"
            )

    # --------------------------------------------------------------------------------------------- call

    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        callback: ProgressCallback | None = None,
        output_type: str = "pil",
        progress_bar: bool = False,
        progress: Callable[[ProgressEvent], None] | None = None,
        num_images_per_prompt: int | None = None,
    ) -> Any:
        """Generate one image. Returns a ``PIL.Image.Image`` (``output_type="np"``: float32 HxWx3 in [0, 1]).

        ``latents``: initial noise [1, 4, height/8, width/8] (before scaling by the scheduler's
        ``init_noise_sigma``, as in diffusers); default: standard normal from ``seed``.
        ``callback(step, total_steps, timestep, latents)`` runs after every denoising step (step from 1);
        ``progress`` gets a `routet2i.ProgressEvent` then (the same callback `EdgeClient.generate` takes).
        An exception raised by either stops the run there (how `EdgeClient` cancels).
        ``num_images_per_prompt``: None (default) returns one image as above; an integer n in [1, 64]
        returns a list of n images. Image i is drawn from seed ``seed + i`` (mod 2**64), so each one can be
        made again alone with that seed (``seed=None``: each from fresh OS entropy). The images are
        denoised one after the other (the prompt encoded once): the memory of one, n times the time; the
        callbacks count steps over all of them (step 1 .. n * num_inference_steps). Not with ``latents``.
        Raises ValueError naming the argument for bad input.
        """
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        self._check_inputs(
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            width,
            height,
            seed,
            latents,
            callback,
        )
        if output_type not in ("pil", "np"):
            raise UsageError(f"output_type={output_type!r}: allowed: pil, np")
        n = 1 if num_images_per_prompt is None else num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= MAX_IMAGES:
            raise UsageError(
                f"num_images_per_prompt={num_images_per_prompt!r}: must be an integer in [1, {MAX_IMAGES}] "
                "(or None: one image, not in a list)"
            )
        if latents is not None and n > 1:
            raise UsageError(
                "latents with num_images_per_prompt > 1: give one image's latents per call, or seed="
            )
        do_cfg = guidance_scale > 1.0
        embeds = self.encode_prompt(prompt, negative_prompt, do_cfg)
        shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        total = int(n) * int(num_inference_steps)
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="denoising", unit="step")
        images = []
        try:
            for k in range(int(n)):
                seed_k = None if seed is None else (int(seed) + k) % (SEED_MAX + 1)
                init = latents
                if init is None:
                    init = np.random.default_rng(seed_k).standard_normal(shape, dtype=np.float32)
                out = self._denoise(
                    embeds, init, int(num_inference_steps), guidance_scale, do_cfg,
                    k * int(num_inference_steps), total, callback, progress, bar,
                )  # fmt: skip
                image = self.decode(out)[0]
                if output_type == "pil":
                    from PIL import Image

                    image = Image.fromarray((image * 255).round().astype(np.uint8))
                images.append(image)
        finally:
            if bar is not None:
                bar.close()
        return images[0] if num_images_per_prompt is None else images

    def _denoise(
        self,
        embeds: np.ndarray,
        latents: np.ndarray,
        num_inference_steps: int,
        guidance_scale: float,
        do_cfg: bool,
        offset: int,
        total: int,
        callback: ProgressCallback | None,
        progress: Callable[[ProgressEvent], None] | None,
        bar: Any,
    ) -> np.ndarray:
        """The denoising loop of one image, from its initial noise to its final latents."""
        scheduler = self._fresh_scheduler()
        scheduler.set_timesteps(num_inference_steps)
        latents = (latents.astype(np.float32) * np.float32(scheduler.init_noise_sigma)).astype(np.float32)
        for i, t in enumerate(scheduler.timesteps):
            model_in = np.concatenate([latents, latents], axis=0) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            t_in = np.asarray(t) if self._timestep_rank == 0 else np.asarray([t])
            noise_pred = self.unet(sample=model_in, timestep=t_in, encoder_hidden_states=embeds)[
                self._unet_out
            ]
            noise_pred = noise_pred.astype(np.float32, copy=False)
            if do_cfg:
                uncond, text = noise_pred[0:1], noise_pred[1:2]
                noise_pred = uncond + np.float32(guidance_scale) * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents)
            if callback is not None:
                callback(offset + i + 1, total, t, latents)
            if progress is not None:
                progress(ProgressEvent("edge", offset + i + 1, total))
            if bar is not None:
                bar.update(1)
        return latents

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> float32 images [B, H, W, 3] in [0, 1] (diffusers' VAE post-processing)."""
        sample = self.vae_decoder(latent_sample=latents / np.float32(self.vae_scaling_factor))[self._vae_out]
        image = np.clip(sample.astype(np.float32) / 2 + 0.5, 0, 1)
        return image.transpose(0, 2, 3, 1)
