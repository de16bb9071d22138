"""Sentence embeddings: a BERT encoder, then the pooling and normalisation its sentence-transformers folder names.

The folder may say (all optional): modules.json (Transformer at the root, then Pooling, then Normalize),
the Pooling module's config.json (one pooling_mode_* set) and sentence_bert_config.json (max_seq_length).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fleetserve.engine.models.bert import BertEncoder, load_bert
from fleetserve.errors import InvalidRequestError, UnsupportedModelError

# sentence-transformers Pooling config key -> our name for the mode
POOLING_MODES = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_MODULES = "sentence_transformers.models."


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def read_modules(model_dir: Path) -> tuple[Path, bool]:
    """The Pooling module's folder and whether a Normalize module follows, from modules.json (when there is one)."""
    pooling_dir, normalize = model_dir / "1_Pooling", False
    for module in _read_json(model_dir / "modules.json") or []:
        kind, path = module.get("type", ""), module.get("path", "")
        if kind == _MODULES + "Transformer":
            if path not in ("", "."):
                raise UnsupportedModelError(
                    f"{model_dir}: the Transformer module must be the folder itself, not {path}"
                )
        elif kind == _MODULES + "Pooling":
            pooling_dir = model_dir / path
        elif kind == _MODULES + "Normalize":
            normalize = True
        else:
            raise UnsupportedModelError(f"{model_dir}: sentence-transformers module {kind!r} is not supported")
    return pooling_dir, normalize


def read_pooling(pooling_dir: Path) -> str:
    """The one pooling mode the Pooling config sets; mean when there is no config."""
    cfg = _read_json(pooling_dir / "config.json")
    if cfg is None:
        return "mean"
    unknown = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True and k not in POOLING_MODES]
    modes = [mode for key, mode in POOLING_MODES.items() if cfg.get(key)]
    if unknown or len(modes) != 1:
        raise UnsupportedModelError(
            f"{pooling_dir}: pooling {unknown + modes or 'none'} is not supported; set exactly one of "
            f"{', '.join(POOLING_MODES)}"
        )
    return modes[0]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden: [B, S, H], mask: [B, S] bool (True: a real token) -> [B, H], over real tokens only."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask[..., None], -1e9).amax(dim=1)  # sentence-transformers fills with -1e9 too
    weights = mask[..., None].to(hidden.dtype)
    total = (hidden * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return total / (count if mode == "mean" else count.sqrt())


class Embedder:
    """A sentence-embedding model ready to run: encoder + pooling (+ normalisation) as the model folder says."""

    def __init__(
        self,
        model_dir: Path,
        encoder: BertEncoder,
        architecture: str,
        max_input_tokens: int,
        pooling: str,
        normalize: bool,
    ):
        cfg = encoder.config
        assert pooling in POOLING_MODES.values(), pooling
        self.model_dir = model_dir
        self.encoder = encoder
        self.architecture = architecture
        self.dimensions = cfg.hidden_size  # one pooling mode: the pooled vector has the hidden size
        self.max_input_tokens = min(max_input_tokens, cfg.max_position_embeddings)
        self.pad_token_id = cfg.pad_token_id
        self.vocab_size = cfg.vocab_size
        self.pooling = pooling
        self.normalize = normalize

    @classmethod
    def load(cls, model_dir: str | Path) -> Embedder:
        """Build the embedder of a sentence-embedding (BERT) folder, as `prepare_model_dir` gives it."""
        model_dir = Path(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        pooling_dir, normalize = read_modules(model_dir)
        pooling = read_pooling(pooling_dir)
        encoder = load_bert(model_dir)
        st_config = _read_json(model_dir / "sentence_bert_config.json") or {}
        max_tokens = st_config.get("max_seq_length") or encoder.config.max_position_embeddings
        architecture = (config.get("architectures") or ["BertModel"])[0]
        return cls(model_dir, encoder, architecture, int(max_tokens), pooling, normalize)

    def check(self, inputs: list[list[int]]) -> None:
        """Raise InvalidRequestError, naming the input, for one that is empty, too long or has unknown ids."""
        for i, ids in enumerate(inputs):
            if not ids:
                raise InvalidRequestError(f"input {i} is empty: it needs at least one token", param="input")
            if len(ids) > self.max_input_tokens:
                raise InvalidRequestError(
                    f"input {i} has {len(ids)} tokens; this model takes at most {self.max_input_tokens}",
                    param="input",
                )
            bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input {i} has token id {bad!r} outside the vocabulary (0..{self.vocab_size - 1})", param="input"
                )

    def embed(self, inputs: list[list[int]]) -> torch.Tensor:
        """float32 [len(inputs), dimensions]: each input (token ids that already include [CLS]/[SEP]) padded to the
        batch's longest with an attention mask; pooled over real tokens only; L2-normalised when the model says so."""
        self.check(inputs)
        if not inputs:
            return torch.empty(0, self.dimensions)
        longest = max(len(ids) for ids in inputs)
        ids = torch.full((len(inputs), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(inputs), longest, dtype=torch.bool)
        for row, seq in enumerate(inputs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = True
        with torch.inference_mode():
            hidden = self.encoder(ids, None if bool(mask.all()) else mask)  # [B, S, H]
            vectors = pool(hidden, mask, self.pooling)
            return F.normalize(vectors, p=2, dim=1) if self.normalize else vectors
