"""The Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2, TinyLlama), able to run a layer range [start, end).

The first range embeds token ids, the last applies the final norm and the LM head, middle ones take and return
hidden states. Tokens of a step are one flat batch [T, hidden]; attention goes through the paged KV cache.
q/k/v and gate/up projections are fused into one matmul each.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fleetserve.engine.attention import AttentionBatch, paged_attention
from fleetserve.engine.models.linear import Linear
from fleetserve.model_files.arch import ModelArch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused kernel; bitwise equal to the formula below in float32
        return F.rms_norm(x, weight.shape, weight, eps)
    # The reference's arithmetic: normalise in float32, then scale in the weight's dtype.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(weight.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, Hugging Face's half-split layout: x*cos + cat(-x2, x1)*sin.

    x: [T, heads, D]; cos, signed_sin: [T, 1, D] with signed_sin = cat(-sin, sin) over the two halves, so the
    rotation is a roll of x (the sign moves into the table, exactly: negation is lossless).
    """
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with linear or llama3 scaling applied; computed on the CPU, also
    while a model is built on the meta device (where these ops would import torch._dynamo, seconds of a start)."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by factor, blend in between.
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch):
        super().__init__()
        h, d = arch.hidden_size, arch.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, d
        self.eps = arch.rms_norm_eps
        self.q_size, self.kv_size = arch.num_heads * d, arch.num_kv_heads * d
        self.scale = d**-0.5
        self.input_norm = nn.Parameter(torch.ones(h))
        self.post_attn_norm = nn.Parameter(torch.ones(h))
        self.qkv = Linear(h, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = Linear(self.q_size, h, bias=False)
        self.gate_up = Linear(h, 2 * arch.intermediate_size, bias=False)
        self.down = Linear(arch.intermediate_size, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        # x: [T, hidden]
        t = x.shape[0]
        qkv = self.qkv(rms_norm(x, self.input_norm, self.eps))
        # q and k are adjacent columns of qkv: rotate them in one go
        qk = rotate(qkv[:, : self.q_size + self.kv_size].view(t, -1, self.head_dim), cos, sin)
        q, k = qk.split((self.num_heads, self.num_kv_heads), dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(t, self.num_kv_heads, self.head_dim)
        x = x + self.o_proj(paged_attention(q, k, v, kv_cache, batch, self.scale))
        gate, up = self.gate_up(rms_norm(x, self.post_attn_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaModel(nn.Module):
    """Decoder layers [layer_start, layer_end) of a Llama-family model.

    ``lm_head`` says whether this part holds the final norm and the LM head; None: when its range ends at the last
    layer. A pipeline's head stage holds them (it samples) and its last stage does not.
    """

    def __init__(
        self, arch: ModelArch, layer_start: int = 0, layer_end: int | None = None, lm_head: bool | None = None
    ):
        super().__init__()
        layer_end = arch.num_layers if layer_end is None else layer_end
        assert 0 <= layer_start < layer_end <= arch.num_layers
        self.arch = arch
        self.layer_start, self.layer_end = layer_start, layer_end
        self.is_first, self.is_last = layer_start == 0, layer_end == arch.num_layers
        self.has_lm_head = self.is_last if lm_head is None else lm_head
        # Given its (empty) weight, the table skips its random init: on the meta device that init would import
        # torch._dynamo, seconds of a worker's start for numbers the loader overwrites anyway.
        table = torch.empty(arch.vocab_size, arch.hidden_size) if self.is_first else None
        self.embed = nn.Embedding(arch.vocab_size, arch.hidden_size, _weight=table) if self.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(layer_start, layer_end))
        if self.has_lm_head:
            self.norm = nn.Parameter(torch.ones(arch.hidden_size))
            self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)

    @property
    def num_local_layers(self) -> int:
        return self.layer_end - self.layer_start

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see ``rotate``) for the step's positions, [T, 1, D], shared by every layer."""
        freqs = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
        cos, sin = freqs.cos(), freqs.sin()
        dtype = self.layers[0].input_norm.dtype
        return torch.cat((cos, cos), dim=-1).to(dtype).unsqueeze(1), torch.cat((-sin, sin), dim=-1).to(dtype).unsqueeze(
            1
        )

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        batch: AttentionBatch,
    ) -> torch.Tensor:
        """inputs: token ids [T] on the first range, hidden states [T, hidden] otherwise. Returns hidden states."""
        x = self.embed(inputs) if self.is_first else inputs
        cos, sin = self.rope(positions)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=False):
            x = layer(x, cos, sin, kv_cache, batch)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head, for the rows that sample only: [N, hidden] -> [N, vocab]."""
        assert self.has_lm_head
        x = rms_norm(hidden, self.norm, self.arch.rms_norm_eps)
        return self.lm_head(x)
