"""Embedding routet2i in a desktop app: generation on a background thread, progress through a callback.

The UI thread never blocks: `EdgeClient.generate` runs on a worker thread, its ``progress`` callback (called
on that worker thread for every edge denoising step and every cloud stream event) only puts events on a
queue, and the UI polls the queue with ``after()``. The same pattern works with Qt (emit a signal from the
callback) or any other toolkit.

    python examples/desktop_app.py --config routet2i.toml          # your bundles and cloud
    python examples/desktop_app.py --demo                          # tiny demo models (full install)
    python examples/desktop_app.py --demo --headless "a red fox"   # no display: a text progress line
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import sys
import threading
from typing import Any


def start_generation(client: Any, prompt: str, events: queue.Queue, **kwargs: Any) -> threading.Thread:
    """Run one generation on a daemon thread; progress, the result or the error go to ``events``."""

    def work() -> None:
        try:
            result = client.generate(prompt, progress=lambda ev: events.put(("progress", ev)), **kwargs)
            events.put(("done", result))
        except Exception as exc:  # shown in the UI, never lost in a thread
            events.put(("error", exc))

    thread = threading.Thread(target=work, name="routet2i-generate", daemon=True)
    thread.start()
    return thread


def run_headless(client: Any, prompt: str, steps: int) -> int:
    """The same loop without a window: the 'UI' prints a progress line while the worker generates."""
    events: queue.Queue = queue.Queue()
    start_generation(client, prompt, events, num_inference_steps=steps)
    while True:
        kind, payload = events.get()
        if kind == "progress":
            print(f"\r{payload.route}: step {payload.step}/{payload.total_steps}", end="", flush=True)
        elif kind == "error":
            print(f"\nfailed: {payload}")
            return 1
        else:
            r = payload
            print(f"\n{r.route} ({r.reason}), PRS^={r.prs}, alpha={r.alpha}, {r.timings['total']:.2f} s")
            r.image.save("desktop_app_out.png")
            print("wrote desktop_app_out.png")
            return 0


def run_window(client: Any, steps: int) -> int:  # pragma: no cover - needs a display
    import tkinter as tk
    from tkinter import ttk

    from PIL import ImageTk

    root = tk.Tk()
    root.title("routet2i")
    prompt = tk.StringVar(value="a red fox in the snow")
    status = tk.StringVar(value="ready")
    ttk.Entry(root, textvariable=prompt, width=60).pack(padx=8, pady=4)
    bar = ttk.Progressbar(root, length=400, mode="determinate")
    bar.pack(padx=8, pady=4)
    ttk.Label(root, textvariable=status).pack(padx=8)
    picture = ttk.Label(root)
    picture.pack(padx=8, pady=8)
    events: queue.Queue = queue.Queue()
    button = ttk.Button(root, text="Generate")

    def on_click() -> None:
        button.state(["disabled"])
        status.set("routing ...")
        bar["value"] = 0
        start_generation(client, prompt.get(), events, num_inference_steps=steps)

    def poll() -> None:  # runs on the UI thread every 50 ms
        with contextlib.suppress(queue.Empty):
            while True:
                kind, payload = events.get_nowait()
                if kind == "progress":
                    bar["maximum"] = payload.total_steps
                    bar["value"] = payload.step
                    status.set(f"{payload.route}: step {payload.step}/{payload.total_steps}")
                elif kind == "error":
                    status.set(f"failed: {payload}")
                    button.state(["!disabled"])
                else:
                    r = payload
                    status.set(f"{r.route} ({r.reason}) in {r.timings['total']:.2f} s, PRS^={r.prs:.3f}")
                    img = ImageTk.PhotoImage(r.image.resize((256, 256)))
                    picture.configure(image=img)
                    picture.image = img  # keep a reference
                    button.state(["!disabled"])
        root.after(50, poll)

    button.configure(command=on_click)
    button.pack(pady=4)
    root.after(50, poll)
    root.mainloop()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="?", default="a red fox in the snow", help="prompt (headless mode)")
    p.add_argument("--config", help="routet2i.toml")
    p.add_argument("--demo", action="store_true", help="tiny demo models and a loopback cloud")
    p.add_argument("--headless", action="store_true", help="no window: print progress")
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        if args.demo:
            from routet2i.training.demo import demo_client

            client = stack.enter_context(demo_client())
        else:
            from routet2i import EdgeClient

            client = stack.enter_context(EdgeClient.from_config(args.config))
        if args.headless:
            return run_headless(client, args.prompt, args.steps)
        return run_window(client, args.steps)


if __name__ == "__main__":
    sys.exit(main())
