"""The examples stay true: the sample config loads, the desktop pattern keeps the UI thread free."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from types import SimpleNamespace

from routet2i.client import ProgressEvent
from routet2i.config import load_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_sample_config_loads():
    c = load_config(EXAMPLES / "routet2i.toml", environ={"ROUTET2I_TOKEN": "t"})
    assert c.router == str(EXAMPLES / "bundles" / "router") and c.cloud == "images.example.com:443"
    assert c.tls and c.target_cloud_rate == 0.3 and c.token == "t" and c.local_only_keywords


def test_desktop_pattern_generates_off_the_ui_thread(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("desktop_app", EXAMPLES / "desktop_app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    ui_thread = threading.get_ident()
    seen = {}

    class FakeClient:
        def generate(self, prompt, progress=None, **kw):
            seen["thread"] = threading.get_ident()
            for i in range(3):
                progress(ProgressEvent("edge", i + 1, 3, "rid"))
            image = SimpleNamespace(save=lambda path: seen.setdefault("saved", path))
            return SimpleNamespace(
                route="edge", reason="router", prs=0.7, alpha=0.4, timings={"total": 0.1}, image=image
            )

    monkeypatch.chdir(tmp_path)
    assert app.run_headless(FakeClient(), "a fox", steps=3) == 0
    out = capsys.readouterr().out
    assert seen["thread"] != ui_thread and "step 3/3" in out and seen["saved"] == "desktop_app_out.png"
