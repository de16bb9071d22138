"""Types that cross process boundaries, free of torch: engine, protocol, worker and gateway all import these.

- ``SamplingParams``: how a request samples and stops (validated here).
- ``RequestOutput``, ``TokenLogprob``, ``EngineStats``: what an engine reports.
- ``KVTransfer``, ``hash_block``, ``block_hashes``: KV contents on the move and the prefix-cache keys.
"""

from fleetserve.contract.kv import KVTransfer, block_hashes, hash_block
from fleetserve.contract.outputs import EngineStats, RequestOutput, TokenLogprob
from fleetserve.contract.sampling import SamplingParams
from fleetserve.contract.stage import StageHop, StageResult, StageSeq

__all__ = [
    "EngineStats",
    "KVTransfer",
    "RequestOutput",
    "SamplingParams",
    "StageHop",
    "StageResult",
    "StageSeq",
    "TokenLogprob",
    "block_hashes",
    "hash_block",
]
