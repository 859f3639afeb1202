"""Domain errors of the cloud endpoint, free of any transport.

The servicer maps each class to one gRPC status code in ONE table (`servicer.STATUS_CODES`); nothing else in
the package chooses a status code. Every message is safe to send to a client: no paths, no tracebacks.
"""

from __future__ import annotations


class CloudError(Exception):
    """Base of every error the endpoint reports to a client (its message is sent as the status details)."""


class InvalidArgument(CloudError, ValueError):
    """A request field is out of bounds; `field` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Unauthenticated(CloudError):
    """No bearer token, or one the store does not know."""


class QuotaExhausted(CloudError):
    """The device has fewer units left in its current period than the request's model costs."""

    def __init__(
        self, device_id: str, limit: int, used: int, period: str, reserved: int = 0, units: int = 1,
        model: str = "",
    ) -> None:  # fmt: skip
        per = "in total" if period == "total" else f"per {period}"
        left = max(limit - used - reserved, 0)
        what = f"model {model!r} costs" if model else "this request needs"
        super().__init__(
            f"quota exhausted for device {device_id!r}: limit {limit} units {per}, {used} used, {reserved} in "
            f"progress, {left} left; {what} {units} unit{'s' if units != 1 else ''}"
        )
        self.device_id = device_id
        self.limit = limit
        self.used = used
        self.reserved = reserved
        self.period = period
        self.units = units
        self.model = model
        self.quota: object = None  # the core may attach the device's QuotaSnapshot (sent as a detail)


class Overloaded(CloudError):
    """The generation queue is full: the request is shed at once instead of waiting."""


class NotReady(CloudError):
    """The pipeline is still loading, or the server is shutting down."""


class RequestInProgress(CloudError):
    """The same request_id of the same device is being generated right now (a concurrent retry)."""


class RequestIdReused(InvalidArgument):
    """A request_id already bound (reserved or charged) to other parameters: refused, nothing generated.

    The charge of a request_id is bound to a digest of every parameter that shapes the image (see
    `store.py`); only an exact retry may reuse the id."""

    def __init__(self, request_id: str) -> None:
        CloudError.__init__(
            self,
            f"request_id reused with different parameters: {request_id!r} was already used for another prompt, "
            "negative prompt, size, steps, guidance, seed or model; send a new request_id for a new image",
        )
        self.field = "request_id"


class StoreUnavailable(CloudError):
    """The quota store could not be reached or written (a dropped connection after one retry, a locked or
    broken database). The client sees only this message; `detail` (credentials redacted) is for the server
    log and the admin CLI."""

    def __init__(
        self, message: str = "the quota store is unavailable; retry later", detail: str = ""
    ) -> None:
        super().__init__(message)
        self.detail = detail or message


class DeadlineExceeded(CloudError):
    """The client's deadline passed before generation could start."""


class GenerationFailed(CloudError):
    """The pipeline raised; the cause is logged server-side, the client gets INTERNAL without details."""


class ReservationLost(CloudError):
    """The quota reservation expired before the result could be committed; nothing was charged."""


# Admin-side errors (CLI and store API), never raised by an RPC:
class DeviceExists(CloudError, ValueError):
    """`device add` for an id that already exists (admin side only)."""


class UnknownDevice(CloudError, KeyError):
    """An admin command names a device the store does not have."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "unknown device"
