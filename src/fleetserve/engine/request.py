"""The engine's Request: one sequence's state inside the engine, with its seeded generator."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from fleetserve.contract import KVTransfer, SamplingParams, StageHop, TokenLogprob


class RequestStatus(enum.IntEnum):
    """Lifecycle, ordered: every status above PREEMPTED is finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6
    """Its step failed in the engine (EngineStepError); it produces no further output."""
    FINISHED_PREFILLED = 7
    """A prefill-only request after its first token: its KV waits for a decode worker to fetch it."""

    @property
    def finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
            RequestStatus.FINISHED_PREFILLED: "prefilled",
        }.get(self)


@dataclass
class Request:
    """One sequence inside the engine. Tokens = prompt + output; KV exists for the first num_computed_tokens."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    """Smaller runs first; equal priorities run in arrival order."""
    retain_kv: bool = False
    """Keep the KV blocks after finishing, until the engine is told to release them (for export)."""
    kv_import: KVTransfer | None = None
    session_id: str | None = None
    """Its KV is pinned as this session's once it finishes (a conversation's next turn reuses it)."""
    session_ttl_s: float | None = None
    prefill_only: bool = False
    """Stop after the first token (unless the request ends there anyway) and keep the KV for a decode worker."""

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at first scheduling."""
    num_preemptions: int = 0
    first_token_time: float | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrival_seq: int = 0
    prefill_hops: dict[str, StageHop] = field(default_factory=dict)
    """On a pipeline head: each stage's part in the steps that computed the prompt, summed."""
    decode_hops: dict[str, StageHop] = field(default_factory=dict)
    decode_steps: int = 0
    prefill_hops_reported: bool = False

    def add_hops(self, hops: list[StageHop], prefill: bool) -> None:
        """Count one pipeline step's hops towards this request's prefill or decode figures."""
        into = self.prefill_hops if prefill else self.decode_hops
        self.decode_steps += not prefill
        for hop in hops:
            seen = into.get(hop.name)
            if seen is None:
                into[hop.name] = StageHop(
                    hop.name, hop.layer_start, hop.layer_end, hop.compute_s, hop.transfer_s, hop.bytes
                )
            else:
                seen.compute_s += hop.compute_s
                seen.transfer_s += hop.transfer_s
                seen.bytes += hop.bytes

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
