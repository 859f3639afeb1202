"""The device side runs with torch, transformers, diffusers and optimum unimportable.

A subprocess installs a meta-path finder that raises ImportError for those packages (and for the
workstation/cloud parts of routet2i), imports `routet2i` and every module of the device package, and runs
the whole device path: schedulers, the ONNX router on a router bundle, the ONNX edge pipeline on the tiny
SD2.1 bundle. The bundles are made in this (torch-enabled) process first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from _device_bundles import edge_bundle_for, handmade_router_bundle

BLOCKER = r"""
import importlib.abc, sys

BLOCKED = ("torch", "transformers", "diffusers", "optimum", "accelerate", "safetensors", "torchvision",
           "routet2i.training", "routet2i.export", "routet2i.cloud_server")


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{name} is blocked: the device side must not import it")
        return None


sys.meta_path.insert(0, Block())
"""

DEVICE_PATH = r"""
import json, pkgutil, importlib
import routet2i

# Every module of the device package (sdk/ -> routet2i), imported with torch & co. unimportable.
modules = sorted(m.name for m in pkgutil.walk_packages(routet2i.__path__, "routet2i."))
for name in modules:
    importlib.import_module(name)

import numpy as np
from routet2i.edge_pipeline import EdgePipeline
from routet2i.router_runtime import RouterSession
from routet2i.schedulers import scheduler_from_config

args = json.loads(sys.argv[1])
router = RouterSession(args["router"])
prs, scores = router.predict(["a red fox in the snow", "two cats"])
one, _ = router.predict_one("a red fox in the snow")
images = {}
for scheduler in ("ddim", "euler", "dpm++", "pndm"):
    pipe = EdgePipeline(args["edge"], scheduler=scheduler)
    steps = []
    img = pipe("a red fox in the snow", negative_prompt="blurry", num_inference_steps=4, seed=0,
               callback=lambda i, n, t, x: steps.append(i))
    images[scheduler] = [img.size, img.mode, steps, float(np.asarray(img).std())]
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "diffusers", "optimum"})
print(json.dumps({"modules": modules, "prs": prs.tolist(), "scores_shape": list(scores.shape),
                  "one": one, "images": images, "heavy": heavy}))
"""


def test_blocker_really_blocks() -> None:
    """The finder itself works: importing torch under it fails (else the test below proves nothing)."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + "\nimport torch\n"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_device_path_is_torch_free(tiny_models, tmp_path) -> None:
    edge = edge_bundle_for(tiny_models["edge-sd21"])
    router, _ = handmade_router_bundle(tmp_path / "router")
    args = {"edge": str(edge), "router": str(router)}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + DEVICE_PATH, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    sdk_files = {p.stem for p in (Path(__file__).resolve().parent.parent / "sdk").glob("*.py")} - {"__init__"}
    imported = {m.split(".")[1] for m in out["modules"]}
    assert sdk_files <= imported, f"sdk modules not covered: {sorted(sdk_files - imported)}"
    assert {"routet2i.edge_pipeline", "routet2i.router_runtime", "routet2i.ort"} <= set(out["modules"])
    schedulers = {"ddim", "euler", "dpm_solver", "pndm"}
    assert {f"routet2i.schedulers.{s}" for s in schedulers} <= set(out["modules"])
    assert len(out["prs"]) == 2 and out["scores_shape"] == [2, 3] and abs(out["one"] - out["prs"][0]) < 1e-5
    for scheduler, (size, mode, steps, std) in out["images"].items():
        # one callback per UNet call: 4 steps (PNDM without skip_prk_steps: 12 Runge-Kutta + 1, as diffusers)
        assert size == [64, 64] and mode == "RGB" and steps == list(range(1, len(steps) + 1)), scheduler
        assert len(steps) == (13 if scheduler == "pndm" else 4), scheduler
        assert std > 0.5, scheduler  # pixel values vary: an image, not a constant
