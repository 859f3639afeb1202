"""Progress of the export commands: the library logs, the CLI shows it.

`export_edge` / `export_router` report their stages with ``logger.info`` (nothing printed: a program that
calls them chooses what to show). `cli_progress`, entered by the commands' ``run``, prints the INFO records of
``routet2i.export`` as plain lines on stdout, the progress a user of ``routet2i export ...`` watches, and hands
every other record to the root logger's handlers (``-v`` / ``ROUTET2I_LOG_LEVEL`` decide which show).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator

__all__ = ["cli_progress"]


class _ToRoot(logging.Handler):
    """Forwards a record the root logger would show to the root's handlers (no duplicate of INFO lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        if record.levelno != logging.INFO and record.levelno >= root.getEffectiveLevel():
            root.handle(record)


@contextlib.contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Without -v: the warnings torch, transformers and the ONNX exporters print while exporting (TracerWarning,
    FutureWarning, the legacy exporter's DeprecationWarning, torch's "W... torchvision is not installed" log
    lines) are not shown; routet2i's own log records (it logs, it does not warn) and every ERROR still are."""
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        yield
        return
    import torch  # noqa: F401 - imported first: importing torch (re)configures its loggers

    torch_log = logging.getLogger("torch")
    saved = torch_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # routet2i itself logs; its warnings are records, shown as before
        torch_log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            torch_log.setLevel(saved)


@contextlib.contextmanager
def cli_progress(name: str = "routet2i.export") -> Iterator[None]:
    """INFO records of ``name`` as plain lines on stdout; third-party warnings hidden unless -v."""
    log = logging.getLogger(name)
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    out.addFilter(lambda record: record.levelno == logging.INFO)
    forward = _ToRoot()
    saved = log.level, log.propagate
    log.setLevel(min(logging.INFO, logging.getLogger().getEffectiveLevel()))
    log.propagate = False
    log.addHandler(out)
    log.addHandler(forward)
    try:
        with _quiet_third_party():
            yield
    finally:
        log.removeHandler(out)
        log.removeHandler(forward)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        out.flush()
