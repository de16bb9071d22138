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


class EngineStepError(FleetServeError):
    """An engine step failed; the requests it ran were stopped and their KV freed, the engine goes on.

    ``request_ids`` names those requests. Another engine may serve them again: the fault was the engine's.
    """

    def __init__(self, message: str, request_ids: list[str] | None = None):
        super().__init__(message)
        self.request_ids = list(request_ids or ())


class StageLinkError(FleetServeError):
    """The link from a pipeline's head down its chain of stages broke (a stage died or stopped answering).

    The head keeps its requests and recomputes them once the pipeline is whole again. ``planned``: the gateway
    changed the pipeline on purpose (a stage was reassigned or stopped), so there is no fault to report.
    """

    def __init__(self, message: str, planned: bool = False):
        super().__init__(message)
        self.planned = planned


class PreprocessError(FleetServeError):
    """A preprocessing helper failed the request: it exited, gave no answer in time, or could not tokenize (HTTP 500).

    A prompt too long to carry back is an InvalidRequestError instead.
    """
