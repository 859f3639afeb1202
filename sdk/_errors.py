"""Errors shared by every part of routet2i. Each subclasses the built-in it resembles.

All are exported from `routet2i` (``except routet2i.CloudError``); importing them imports nothing heavy
(no grpc, no onnxruntime)."""

from __future__ import annotations

from typing import Any


class UsageError(ValueError):
    """Bad user input at a CLI or public boundary: printed as one line, exit code 2."""


class BundleError(ValueError):
    """A bundle folder is malformed or does not match its manifest (names the file)."""


class BundleFileMissing(FileNotFoundError):
    """A file a bundle needs is missing (names the file)."""


class GenerationCancelled(Exception):
    """The generation was cancelled (an `AsyncEdgeClient.generate` task cancelled, or the ``cancel`` event
    of `EdgeClient.generate` set): the edge run stopped at the next denoising step, a cloud stream was
    cancelled."""


class CloudError(ConnectionError):
    """The cloud did not produce an image. ``reason`` is the `GenerateResult.reason` of the fallback; the
    message says why (e.g. ``UNAVAILABLE: connection refused``, ``UNAUTHENTICATED: unknown token``)."""

    reason = "cloud_error"

    def __init__(self, message: str, *, code: Any = None, request_id: str = "", attempts: int = 0):
        super().__init__(message)
        self.code = code  # last gRPC status code (a grpc.StatusCode; None: no call was made)
        self.request_id = request_id  # the idempotency key the attempts used
        self.attempts = attempts  # RPC attempts made


class CloudUnavailable(CloudError):
    """The cloud could not be reached in time (after retries), is overloaded, or the breaker is open."""

    reason = "cloud_unavailable"


class CloudRejected(CloudError):
    """The cloud answered with an error that a retry would not fix (INVALID_ARGUMENT, UNAUTHENTICATED...)."""

    reason = "cloud_error"


class QuotaExhausted(CloudError):
    """No cloud units left this period (RESOURCE_EXHAUSTED with a QuotaFailure detail)."""

    reason = "quota_exhausted"

    def __init__(self, message: str, *, quota: Any = None, **kw: Any):
        super().__init__(message, **kw)
        self.quota = quota  # the quota status (a `routet2i.policy.QuotaInfo`), when the server sent one
