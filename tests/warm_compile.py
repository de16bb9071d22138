"""Compile the decode-step graphs that tests/integration/test_compiled_decode.py compiles, into the session's
inductor cache, in a process of its own.

``python -m tests.warm_compile`` builds the same runner as that module (the same weights, buckets and options)
and waits for its compilation. The test session starts it at collection when the module will run, so that the
C++ kernels are built while the tests before it run (on a fresh cache that is most of a minute); the module's
own compilation then finds them in the cache. It only saves time: the module compiles and checks everything
itself either way.
"""

from __future__ import annotations

import sys

from fleetserve.model_files import DEFAULT_MODEL, prepare_model_dir
from tests.integration.test_compiled_decode import runner

if __name__ == "__main__":
    compiled = runner(prepare_model_dir(DEFAULT_MODEL, progress=False), compile=True).compiled
    sys.exit(0 if compiled is not None and compiled.wait(timeout=900) else 1)
