"""The KV block pool: free blocks in LRU order, reference counts, block tables and prefix-cache hashes.

Pure bookkeeping, no tensors: the model runner owns the memory, this module says which block holds what.
A full block is keyed by hash(parent block's hash, its token ids); when a sequence frees it the block keeps
its key and waits in the free list, oldest first, so a later request with the same prefix can take it back
until its memory is needed for something else.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from fleetserve.contract.kv import ROOT_HASH, block_hashes, hash_block


@dataclass
class KVCacheStats:
    """A snapshot of the pool, for engine stats and heartbeats."""

    num_blocks: int
    used_blocks: int
    free_blocks: int
    cached_blocks: int
    """Free blocks that still hold a reusable prefix."""
    prefix_queries: int
    prefix_hits: int
    """Blocks found in the prefix cache out of prefix_queries blocks looked up."""


class KVCacheManager:
    """Allocates blocks to sequences. Verbs: lookup_prefix, allocate, commit_full_blocks, shrink, free."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_count = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        # Blocks with no owner, least recently freed first; their hashes stay valid until reused.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._tables: dict[str, list[int]] = {}  # request id -> block ids
        self._hashes: dict[str, list[int]] = {}  # request id -> hashes of its full, committed blocks
        self._cached_free = 0  # free blocks that still hold a key: kept as blocks move, read every step
        self.prefix_queries = 0
        self.prefix_hits = 0

    # -- queries ---------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """New blocks a sequence needs so that its first ``num_tokens`` tokens have slots."""
        have = len(self._tables.get(request_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def stats(self) -> KVCacheStats:
        return KVCacheStats(
            num_blocks=self.num_blocks,
            used_blocks=self.num_blocks - len(self._free),
            free_blocks=len(self._free),
            cached_blocks=self._cached_free,
            prefix_queries=self.prefix_queries,
            prefix_hits=self.prefix_hits,
        )

    def cached_hashes(self) -> set[int]:
        """Every block hash this pool can serve right now (owned or free-but-cached)."""
        return set(self._cached)

    def cached_prefix(self, token_ids: Sequence[int]) -> int:
        """Tokens of ``token_ids``' start whose blocks the cache holds now (as lookup_prefix would find them, at
        least one token left over), without taking them or counting the query."""
        if not self.enable_prefix_caching:
            return 0
        found = 0
        for h in block_hashes(token_ids[: len(token_ids) - 1], self.block_size):
            if h not in self._cached:
                break
            found += 1
        return found * self.block_size

    # -- verbs -----------------------------------------------------------------------------------------

    def lookup_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Attach the longest cached prefix of ``token_ids`` to a sequence that has no blocks yet.

        At least one token is always left to compute, so the step that follows can produce logits.
        Returns the number of tokens whose KV is now in place (a multiple of the block size).
        """
        assert request_id not in self._tables, "prefix lookup happens once, before any allocation"
        table: list[int] = []
        hashes: list[int] = []
        if self.enable_prefix_caching:
            wanted = block_hashes(token_ids[: len(token_ids) - 1], self.block_size)
            self.prefix_queries += len(wanted)
            for h in wanted:
                block = self._cached.get(h)
                if block is None:
                    break
                self._take(block)
                table.append(block)
                hashes.append(h)
            self.prefix_hits += len(table)
        self._tables[request_id] = table
        self._hashes[request_id] = hashes
        return len(table) * self.block_size

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Give a sequence slots for its first ``num_tokens`` tokens. False, changing nothing, if too few blocks."""
        need = self.blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            return False
        table = self._tables.setdefault(request_id, [])
        self._hashes.setdefault(request_id, [])
        for _ in range(need):
            block, _ = self._free.popitem(last=False)
            old = self._block_hash[block]
            if old is not None:  # evict the stale prefix this block held
                del self._cached[old]
                self._block_hash[block] = None
                self._cached_free -= 1
            self._ref_count[block] = 1
            table.append(block)
        return True

    def commit_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Key every block that is now full of computed KV, so other requests can reuse it."""
        if not self.enable_prefix_caching:
            return
        hashes = self._hashes[request_id]
        table = self._tables[request_id]
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_computed:
            i = len(hashes)
            parent = hashes[-1] if hashes else ROOT_HASH
            h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            hashes.append(h)
            block = table[i]
            if h not in self._cached and self._block_hash[block] is None:
                self._cached[h] = block
                self._block_hash[block] = h

    def shrink(self, request_id: str, num_tokens: int) -> None:
        """Give back a sequence's blocks past its first ``num_tokens`` tokens (slots of rejected draft tokens)."""
        table = self._tables.get(request_id)
        if table is None:
            return
        keep = -(-num_tokens // self.block_size)
        assert keep >= len(self._hashes[request_id]), "committed blocks are never given back"
        while len(table) > keep:
            block = table.pop()
            self._ref_count[block] -= 1
            assert self._ref_count[block] == 0, "a block past the committed ones belongs to this sequence alone"
            self._free[block] = None
            self._free.move_to_end(block, last=False)

    def free(self, request_id: str) -> None:
        """Release a sequence's blocks. Keyed blocks stay reusable; the tail goes first when memory is needed."""
        table = self._tables.pop(request_id, None)
        self._hashes.pop(request_id, None)
        if table is None:
            return
        for block in reversed(table):
            self._ref_count[block] -= 1
            assert self._ref_count[block] >= 0
            if self._ref_count[block] == 0:
                self._free[block] = None
                if self._block_hash[block] is None:
                    self._free.move_to_end(block, last=False)  # nothing to keep: reuse it first
                else:
                    self._cached_free += 1

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def _take(self, block: int) -> None:
        if self._ref_count[block] == 0:
            del self._free[block]
            self._cached_free -= 1  # only keyed blocks are found by lookup_prefix
        self._ref_count[block] += 1
