"""What moves along a pipeline of stages, free of torch: each step's sequences, and what every hop cost.

A pipeline's head plans a step (its scheduler owns every KV block of every stage: a block id means the same
slots on each stage), runs its layers, and sends the step's hidden states down the chain with one ``StageSeq``
per sequence. Each stage runs its layers on them and passes them on; the last returns the hidden states of the
rows that sample to the head, which applies the LM head and samples. Every stage adds a ``StageHop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StageSeq:
    """One sequence's share of a pipeline step: positions [start, start + num_tokens) in these blocks."""

    start: int
    num_tokens: int
    block_table: list[int]
    samples: bool
    """This chunk ends at the sequence's last token: its last row's hidden state goes back to the head."""


@dataclass
class StageHop:
    """One stage's part of one step: its compute, and the link that brought the step to it."""

    name: str
    layer_start: int
    layer_end: int
    compute_s: float
    transfer_s: float = 0.0
    """Sender's send to this stage's decoded tensor (wall clocks of two machines: as good as their sync)."""
    bytes: int = 0
    """Hidden-state bytes this stage received for the step."""


@dataclass
class StageResult:
    """What comes back to the head for one step: the sampling rows' hidden states (as the transport carries them),
    every hop, or why the step failed on some stage."""

    step: int
    hidden: object = None
    """A [rows, hidden] tensor on the head's side; the contract does not fix its type."""
    hops: list[StageHop] = field(default_factory=list)
    error: str = ""
    return_transfer_s: float = 0.0
    """The last stage's send to the head's decoded tensor."""
    return_bytes: int = 0
