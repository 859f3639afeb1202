"""Cold start (issue 13 items 1-2): the hash cache through EdgePipeline, ONNX Runtime's optimized-graph cache
(written on the first load, loaded with optimization off later, safe when corrupt), the VAE encoder loaded
only when asked for. Timings are measured in bench/bench_coldstart.py, not asserted here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _device_bundles import edge_bundle_for
from routet2i._errors import BundleFileMissing
from routet2i.bundle import write_manifest
from routet2i.edge_pipeline import EdgePipeline
from routet2i.ort import SessionConfig

pytest.importorskip("torch")  # the tiny edge bundle is exported from torch


@pytest.fixture(scope="module")
def edge_bundle(tiny_models) -> Path:
    return edge_bundle_for(tiny_models["edge-sd21"])


def _image(pipe: EdgePipeline) -> np.ndarray:
    return pipe("a red fox", num_inference_steps=2, seed=3, output_type="np")


def _graphs(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "ort").iterdir() if not p.name.startswith("."))


def test_first_launch_writes_caches_second_uses_them(edge_bundle, tmp_path) -> None:
    cache = tmp_path / "cache"
    plain = EdgePipeline(
        edge_bundle, providers=["cpu"], cache_dir=cache, session_config=SessionConfig(graph_cache=False)
    )
    assert plain.unet.graph_cache == "off" and not (cache / "ort").exists()
    assert plain.check.hashed_files == plain.check.files  # first launch: every file hashed
    want = _image(plain)

    first = EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache)
    assert {m.graph_cache for m in (first.text_encoder, first.unet, first.vae_decoder)} == {"written"}
    assert len(_graphs(cache)) == 3 and first.check.hashed_files == 0  # hash cache written by `plain`
    second = EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache)
    assert {m.graph_cache for m in (second.text_encoder, second.unet, second.vae_decoder)} == {"hit"}
    assert second.check.cached_files == second.check.files and second.check.hashed_files == 0
    for pipe in (first, second):
        assert np.abs(_image(pipe) - want).max() <= 1e-5
    assert {"verify", "sessions", "session_unet", "ready"} <= set(second.timings)
    # "always" ignores the hash cache; the signature-free bundle still loads from the graph cache.
    always = EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache, check_hashes="always")
    assert always.check.hashed_files == always.check.files and always.unet.graph_cache == "hit"


def test_corrupt_graph_cache_falls_back_and_rebuilds(edge_bundle, tmp_path) -> None:
    cache = tmp_path / "cache"
    want = _image(EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache))
    # 1) A changed file (its stamp no longer matches): not used, rebuilt.
    for folder in _graphs(cache):
        (folder / "model.onnx").write_bytes(b"garbage")
    pipe = EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache)
    assert pipe.unet.graph_cache == "written"
    assert np.abs(_image(pipe) - want).max() <= 1e-5
    # 2) Garbage whose stamps were recorded as valid: ONNX Runtime refuses it, the entry is deleted and the
    # bundle's own graph loads (and is cached again).
    for folder in _graphs(cache):
        (folder / "model.onnx").write_bytes(b"garbage")
        stamps = {p.name: [*_stamp(p)] for p in folder.iterdir() if p.is_file() and p.name != "stamps.json"}
        (folder / "stamps.json").write_text(json.dumps(stamps))
    pipe = EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache)
    assert pipe.unet.graph_cache == "written"
    assert np.abs(_image(pipe) - want).max() <= 1e-5
    assert EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache).unet.graph_cache == "hit"


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def test_graph_cache_key_follows_the_options_and_keeps_one_entry_per_graph(edge_bundle, tmp_path) -> None:
    cache = tmp_path / "cache"
    EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=cache)
    before = _graphs(cache)
    basic = EdgePipeline(
        edge_bundle,
        providers=["cpu"],
        cache_dir=cache,
        session_config=SessionConfig(graph_optimization="basic"),
    )
    assert basic.unet.graph_cache == "written"  # another optimization level: another key
    after = _graphs(cache)
    assert len(after) == 3 and not set(before) & set(after)  # the older entries of the same graphs replaced
    off = EdgePipeline(
        edge_bundle,
        providers=["cpu"],
        cache_dir=cache,
        session_config=SessionConfig(graph_optimization="disable"),
    )
    assert off.unet.graph_cache == "off"  # nothing to cache when ONNX Runtime optimizes nothing


def test_unwritable_cache_dir_still_loads(edge_bundle, tmp_path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    pipe = EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=blocked / "cache")
    assert pipe.unet.graph_cache in ("off", "failed")
    assert _image(pipe).shape == (64, 64, 3)


def test_vae_encoder_loads_only_when_asked(edge_bundle, tmp_path) -> None:
    pipe = EdgePipeline(edge_bundle, providers=["cpu"], cache_dir=tmp_path / "cache")
    with pytest.raises(BundleFileMissing, match="no VAE encoder"):
        pipe.vae_encoder  # noqa: B018
    copy = tmp_path / "edge"
    shutil.copytree(edge_bundle, copy)
    (copy / "vae_encoder").mkdir()
    shutil.copyfile(copy / "vae_decoder" / "model.onnx", copy / "vae_encoder" / "model.onnx")  # any graph
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, "edge", {"edge": manifest["edge"]})
    pipe = EdgePipeline(copy, providers=["cpu"], cache_dir=tmp_path / "cache")
    assert pipe._vae_encoder is None  # not created at load
    encoder = pipe.vae_encoder
    assert encoder is pipe.vae_encoder and encoder.path == copy / "vae_encoder" / "model.onnx"
