"""Convert a GGUF file once into a cached safetensors HF folder.

transformers can load GGUF directly but dequantizes every tensor on every load
(~40 s for the default model on a 2-core CPU), and a GGUF-loaded model cannot be
``save_pretrained``. So the first load converts: dequantize, copy the state dict into a
fresh model of the same config, save model + tokenizer (with its chat template) into
``<cache>/models/<stem>-<digest16>-c<converter>/``. Later loads find that folder by
the GGUF's sha256 (the ``source_digest``) and load it in a second or two.

The folder appears atomically (built under a temporary name, then renamed) and a file
lock keeps two processes from converting the same file at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.errors import BaseModelNotFound, UnsupportedArchitecture
from server.formats.manifest import file_sha256, utc_now_iso

log = logging.getLogger(__name__)

# Bump when the conversion changes what lands in the cache: old folders are then ignored.
CONVERTER_VERSION = 1
SUPPORTED_GGUF_ARCHITECTURES = ("llama",)
SOURCE_RECORD = "switchboard_source.json"


def cache_root() -> Path:
    """``$SWITCHBOARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/switchboard``, else ``~/.cache``."""
    if explicit := os.environ.get("SWITCHBOARD_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "switchboard"


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    """The cached HF folder (config, safetensors weights, tokenizer, chat template)."""
    source_digest: str
    """sha256 of the GGUF file the folder was converted from."""
    cache_hit: bool
    convert_seconds: float = 0.0


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file, read from its header only."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        return str(field.contents())
    except KeyError:
        raise UnsupportedArchitecture(f"{path}: GGUF has no general.architecture key") from None
    except Exception as exc:  # gguf raises ValueError/struct errors on foreign files
        raise BaseModelNotFound(f"{path}: not a readable GGUF file ({exc})") from None


def _folder_for(path: Path, digest: str, root: Path) -> Path:
    return root / "models" / f"{path.stem}-{digest[:16]}-c{CONVERTER_VERSION}"


def _is_complete(folder: Path, digest: str) -> bool:
    record = folder / SOURCE_RECORD
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return (
        data.get("source_digest") == digest
        and data.get("converter_version") == CONVERTER_VERSION
    )


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_gguf(path: Path, cache_dir: Path | None = None) -> PreparedModel:
    """Return the cached HF folder for GGUF ``path``, converting it on the first call."""
    digest = file_sha256(path)  # ~0.1 s for the default model
    root = cache_dir or cache_root()
    folder = _folder_for(path, digest, root)
    if _is_complete(folder, digest):
        return PreparedModel(folder, digest, cache_hit=True)
    # Only a miss reads the header: GGUFReader parses the whole vocabulary (~4 s).
    architecture = gguf_architecture(path)
    if architecture not in SUPPORTED_GGUF_ARCHITECTURES:
        raise UnsupportedArchitecture(
            f"{path}: GGUF architecture '{architecture}' is not supported "
            f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
        )
    with _file_lock(folder.with_name(folder.name + ".lock")):
        if _is_complete(folder, digest):  # another process converted it while we waited
            return PreparedModel(folder, digest, cache_hit=True)
        started = time.perf_counter()
        _convert(path, digest, folder)
        return PreparedModel(folder, digest, False, time.perf_counter() - started)


def _convert(path: Path, digest: str, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once; later loads use the cache)", path, folder)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = gguf_model.config
    # The dequantized weights are plain fp32; the copy must not claim GGUF quantization.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = ""
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    fresh.tie_weights()
    still_meta = [name for name, p in fresh.named_parameters() if p.is_meta]
    if unexpected or still_meta:
        raise UnsupportedArchitecture(
            f"{path}: GGUF tensors do not map onto the model "
            f"(unexpected {unexpected[:3]}, missing {still_meta[:3] or missing[:3]})"
        )
    fresh.generation_config = gguf_model.generation_config

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        fresh.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {
            "source_path": str(path),
            "source_digest": digest,
            "converter_version": CONVERTER_VERSION,
            "created_at": utc_now_iso(),
        }
        (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if folder.exists():  # an incomplete folder from a crashed conversion
            shutil.rmtree(folder)
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
