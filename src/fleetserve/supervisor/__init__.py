"""Owns fleetserve's child processes: starting them, collecting their output, waiting until they are ready,
stopping them, and keeping them running.

- :mod:`~fleetserve.supervisor.child`: one child (:class:`ChildSpec`, :class:`Child`): its own session and process
  group, its output read line by line (kept, echoed with a ``[name]`` prefix, appended to a log file rotated by
  size), readiness by a regex, stopping by SIGTERM then SIGKILL; optionally SIGTERM when its parent dies (Linux).
- :mod:`~fleetserve.supervisor.children`: a set of children by name (:class:`Supervisor`): start, wait until all
  are ready, stop all in reverse order.
- :mod:`~fleetserve.supervisor.keeper`: restart supervision (:class:`Keeper`, :class:`RestartPolicy`): a crashed
  child starts again after a growing backoff; too many crashes within a window make it crash-looping.

This package imports neither torch nor the engine: `fleetserve up` and the gateway use it to run local workers.
"""

from fleetserve.supervisor.child import (
    DEFAULT_GRACE_S,
    DRAIN_S,
    POLL_S,
    TAIL_LINES,
    Child,
    ChildExited,
    ChildSpec,
    ReadyTimeout,
)
from fleetserve.supervisor.children import Supervisor
from fleetserve.supervisor.keeper import LAST_LINES, Keeper, KeeperEvent, KeptStatus, RestartPolicy, describe_exit

__all__ = [
    "DEFAULT_GRACE_S",
    "DRAIN_S",
    "LAST_LINES",
    "POLL_S",
    "TAIL_LINES",
    "Child",
    "ChildExited",
    "ChildSpec",
    "Keeper",
    "KeeperEvent",
    "KeptStatus",
    "ReadyTimeout",
    "RestartPolicy",
    "Supervisor",
    "describe_exit",
]
