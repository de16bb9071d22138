"""KV cache contents that move between engines, and the prefix-block keys every process computes alike."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

ROOT_HASH = 0
"""Parent key of a sequence's first block."""


def hash_block(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Stable 64-bit key of a full block: the same in every process, so a gateway can compute it too."""
    payload = struct.pack(f"<Q{len(token_ids)}I", parent_hash, *token_ids)
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """Keys of every full block of ``token_ids``, in order (a trailing partial block has none)."""
    hashes: list[int] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


@dataclass
class KVTransfer:
    """KV cache contents of a sequence's tokens [start, start + num_tokens), as bytes.

    ``data`` holds a tensor of shape [num_layers, num_tokens, 2, num_kv_heads, head_dim] (2 = key, value)
    in ``dtype``, contiguous, in token order, so engines with other block sizes can import it. ``token_ids`` are
    the sequence's tokens up to the end of that range at least (what the KV belongs to).
    """

    token_ids: list[int]
    num_tokens: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    data: bytes
    start: int = 0
