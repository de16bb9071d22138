"""Our BERT encoder (the body of sentence-embedding models such as all-MiniLM-L6-v2): config, layers, weight loading.

Inference only: eval mode, no dropout, float32. Weights come from the folder's safetensors (never pickle), with or
without the ``bert.`` prefix that BertFor* checkpoints put on the encoder's tensors.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from fleetserve.errors import UnsupportedModelError

# config.json hidden_act -> the function; transformers' "gelu" is the exact (erf) one.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class BertConfig:
    """The numbers the encoder needs from config.json; everything else there is ignored."""

    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    hidden_act: str

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> BertConfig:
        """Validate a config.json dict; refuse what this encoder does not implement."""
        family = cfg.get("model_type", "bert")
        if family != "bert":  # RoBERTa, XLM-R, MPNet ... differ in positions or layers: refused, not run wrong
            raise UnsupportedModelError(f"model_type {family!r} is not supported by the BERT encoder; only 'bert'")
        act = cfg.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"BERT hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        positions = cfg.get("position_embedding_type", "absolute")
        if positions != "absolute":
            raise UnsupportedModelError(f"BERT position_embedding_type {positions!r} is not supported; only absolute")
        if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
            raise UnsupportedModelError("a BERT decoder (is_decoder / add_cross_attention) is not supported")
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        if hidden % heads:
            raise UnsupportedModelError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_hidden_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            pad_token_id=cfg.get("pad_token_id") or 0,
            hidden_act=act,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> BertConfig:
        return cls.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))


class BertEmbeddings(nn.Module):
    """Token + absolute position + token type (always type 0 here) embeddings, then LayerNorm."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        # Plain tables, left uninitialised: the checkpoint fills them (nn.Embedding's random init on the meta device
        # imports sympy, most of a second of a worker's start).
        self.word = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.position = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.hidden_size))
        self.token_type = nn.Parameter(torch.empty(cfg.type_vocab_size, cfg.hidden_size))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [B, S] -> [B, S, H]; summed in transformers' order (word + type, then + position)
        x = F.embedding(ids, self.word) + self.token_type[0]
        return self.norm(x + self.position[: ids.shape[1]])


PACK_BELOW = 0.85
"""A batch whose real tokens are fewer than this share of its padded size runs on its real tokens alone."""


@dataclass(frozen=True)
class Padding:
    """Where a padded batch's real tokens sit, so that all but attention runs on the real tokens alone.

    A batch of one long input and many short ones would otherwise spend most of its matmuls on padding."""

    rows: int
    width: int
    index: torch.Tensor | None
    """[T]: the flat positions (row * width + column) of the real tokens, in order; None when the batch is run
    padded (little padding: gathering the real tokens would cost more than the padding does)."""
    attn_mask: torch.Tensor  # [B, 1, 1, S] additive: 0 for a real key, -inf for padding

    @classmethod
    def of(cls, mask: torch.Tensor) -> Padding:
        """mask: [B, S] bool, True for real tokens."""
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
        real = int(mask.sum())
        index = mask.reshape(-1).nonzero().squeeze(1) if real < PACK_BELOW * mask.numel() else None
        return cls(mask.shape[0], mask.shape[1], index, additive[:, None, None, :])

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [B, S, D], zeros at the padding (when packed; as computed otherwise)."""
        if self.index is None:
            return x.view(self.rows, self.width, -1)
        out = x.new_zeros(self.rows * self.width, x.shape[-1])
        return out.index_copy_(0, self.index, x).view(self.rows, self.width, -1)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [T, D]."""
        x = x.reshape(self.rows * self.width, -1)
        return x if self.index is None else x.index_select(0, self.index)


class BertLayer(nn.Module):
    """Post-norm transformer layer: self-attention over the whole sequence, then the feed-forward block."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(h, 3 * h)  # query, key and value projections fused into one matmul
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(h, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, padding: Padding | None, rows: int) -> torch.Tensor:
        # x: [T, H], the batch's real tokens row after row (T = rows * S when there is no padding)
        qkv = self.qkv(x)  # [T, 3H]
        qkv = padding.pad(qkv) if padding is not None else qkv.view(rows, -1, qkv.shape[-1])
        b, s, h = qkv.shape[0], qkv.shape[1], x.shape[-1]
        q, k, v = qkv.view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        mask = padding.attn_mask if padding is not None else None
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # [B, S, heads, head_dim]
        a = padding.unpad(a) if padding is not None else a.reshape(b * s, h)
        x = self.attn_norm(x + self.attn_out(a))
        return self.out_norm(x + self.down(self.act(self.up(x))))


class BertEncoder(nn.Module):
    """Token ids (with [CLS]/[SEP] already in place) -> the last layer's hidden states."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: [B, S]; mask: [B, S] bool, True for real tokens (None: no padding) -> [B, S, H], zeros at padding.

        Each input's tokens attend to its own real tokens only, so its states do not depend on the rest of the batch."""
        x = self.embeddings(ids)  # [B, S, H]
        padding = Padding.of(mask) if mask is not None else None
        x = padding.unpad(x) if padding is not None else x.reshape(-1, x.shape[-1])  # [T, H]
        for layer in self.layers:
            x = layer(x, padding, ids.shape[0])
        if padding is None:
            return x.view(*ids.shape, -1)
        out = padding.pad(x)
        return out if padding.index is not None else out * mask[..., None]  # run padded: zero the padding's states


def _hf_names(cfg: BertConfig) -> dict[str, list[str]]:
    """Our parameter name -> the checkpoint tensors it is made of (several: concatenated along the rows)."""
    names = {
        "embeddings.word": ["embeddings.word_embeddings.weight"],
        "embeddings.position": ["embeddings.position_embeddings.weight"],
        "embeddings.token_type": ["embeddings.token_type_embeddings.weight"],
    }
    for part in ("weight", "bias"):
        names[f"embeddings.norm.{part}"] = [f"embeddings.LayerNorm.{part}"]
        for i in range(cfg.num_hidden_layers):
            ours, hf = f"layers.{i}", f"encoder.layer.{i}"
            names[f"{ours}.qkv.{part}"] = [f"{hf}.attention.self.{p}.{part}" for p in ("query", "key", "value")]
            names[f"{ours}.attn_out.{part}"] = [f"{hf}.attention.output.dense.{part}"]
            names[f"{ours}.attn_norm.{part}"] = [f"{hf}.attention.output.LayerNorm.{part}"]
            names[f"{ours}.up.{part}"] = [f"{hf}.intermediate.dense.{part}"]
            names[f"{ours}.down.{part}"] = [f"{hf}.output.dense.{part}"]
            names[f"{ours}.out_norm.{part}"] = [f"{hf}.output.LayerNorm.{part}"]
    return names


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    """Every tensor name in the folder's safetensors files -> its file."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{model_dir} has no .safetensors weights")
    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            index.update(dict.fromkeys(st.keys(), f))
    return index


def load_bert(model_dir: str | Path) -> BertEncoder:
    """The encoder of a Hugging Face BERT folder, weights in float32, in eval mode."""
    model_dir = Path(model_dir)
    cfg = BertConfig.from_dir(model_dir)
    index = _tensor_files(model_dir)
    prefix = "bert." if "embeddings.word_embeddings.weight" not in index else ""
    wanted = _hf_names(cfg)
    missing = [prefix + n for sources in wanted.values() for n in sources if prefix + n not in index]
    if missing:
        raise UnsupportedModelError(f"{model_dir} lacks BERT weights {', '.join(missing[:4])}")
    handles = {f: safe_open(str(f), framework="pt") for f in set(index.values())}

    def tensor(name: str) -> torch.Tensor:
        return handles[index[prefix + name]].get_tensor(prefix + name).to(torch.float32)

    state = {
        ours: tensor(sources[0]) if len(sources) == 1 else torch.cat([tensor(n) for n in sources])
        for ours, sources in wanted.items()
    }
    with torch.device("meta"):  # no random initialisation: every parameter is assigned from the checkpoint
        model = BertEncoder(cfg)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval().requires_grad_(False)
