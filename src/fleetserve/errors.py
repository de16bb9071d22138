"""Typed errors shared by every layer; the HTTP and gRPC edges map them to status codes."""


class FleetServeError(Exception):
    """Base class of every error fleetserve raises on purpose."""


class InvalidRequestError(FleetServeError, ValueError):
    """The request itself is wrong (bad sampling parameter, empty or too-long prompt).

    ``param`` names the offending field, when there is one, so an API can point at it.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownModelError(FleetServeError, LookupError):
    """No model by that name or path is known."""


class NotFoundError(FleetServeError, LookupError):
    """The request names something that does not exist (a request id, a worker): HTTP 404.

    ``param`` names the field that named it.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnsupportedModelError(FleetServeError):
    """The model exists but its architecture or file format is not supported."""


class CapacityError(FleetServeError):
    """Not enough room (KV cache blocks, queue slots) to take the request."""


class NoWorkerError(CapacityError):
    """No healthy worker serves the model right now (HTTP 503 with Retry-After)."""


class UpstreamError(FleetServeError):
    """A worker failed while serving the request (HTTP 502)."""
