"""Per-model tokenizers on the gateway, fetched from the first worker of each model over gRPC.

The gateway needs no model files: a worker sends its tokenizer files when it registers, and every later worker
of the same model must report the same tokenizer fingerprint, or it is refused.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from fleetserve.gateway.registry import WorkerRecord
from fleetserve.model_files import cache_root
from fleetserve.protocol import fleet_pb2 as pb
from fleetserve.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class TokenizerStore:
    """model name -> Tokenizer, plus each model's context window."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder or cache_root() / "gateway-tokenizers"
        self.tokenizers: dict[str, Tokenizer] = {}
        self.fingerprints: dict[str, str] = {}
        self.max_model_len: dict[str, int] = {}
        self.folders: dict[str, Path] = {}

    async def on_register(self, record: WorkerRecord) -> None:
        """Fetch the model's tokenizer from its first worker; refuse a worker whose tokenizer differs."""
        info = record.info
        known = self.fingerprints.get(info.model)
        if known is not None:
            if info.tokenizer_fingerprint != known:
                raise ValueError(
                    f"worker {info.name} serves {info.model} with another tokenizer "
                    f"({info.tokenizer_fingerprint[:12]} != {known[:12]})"
                )
            return
        files: pb.TokenizerFiles = await record.stub.GetTokenizer(pb.TokenizerRequest(), timeout=30)
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / files.fingerprint[:32]
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(prefix=".fetching-", dir=self.folder))
            for name, data in files.files.items():
                if "/" in name or name.startswith("."):
                    raise ValueError(f"worker sent a tokenizer file with a bad name: {name!r}")
                (tmp / name).write_bytes(data)
            try:
                tmp.rename(target)
            except OSError:  # another worker of this model registered at the same moment and got there first
                shutil.rmtree(tmp, ignore_errors=True)
                if not target.exists():
                    raise
        self.tokenizers[info.model] = Tokenizer.from_dir(target)
        self.folders[info.model] = target
        self.fingerprints[info.model] = files.fingerprint
        self.max_model_len[info.model] = info.max_model_len
        log.info("tokenizer for %s fetched from %s", info.model, info.name)

    def get(self, model: str) -> Tokenizer | None:
        return self.tokenizers.get(model)
