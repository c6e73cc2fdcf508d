"""The adapter store: names to folders inside configured roots, and what changed on disk.

Nothing is ever loaded from a path a request gives: requests name adapters, names are
plain identifiers, and a name resolves only to ``<root>/<name>`` for one of the
configured roots. A folder that is (or contains) a symlink leading outside its root
is refused. Other files in an adapter folder (training config, data, model card) are
ignored; only the weight files and the manifest define a version.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.errors import AdapterNotFound, AdapterRefused, InvalidAdapterName, quote
from server.formats.manifest import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_NAME_RE,
    ADAPTER_WEIGHTS_FILE,
    MANIFEST_FILE,
)

_SIGNATURE_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, MANIFEST_FILE)

Signature = tuple[tuple[str, int, int], ...]
"""(file name, size, mtime_ns) of the files that define a version; cheap to poll."""


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {quote(name, 40)}: names are [a-z0-9][a-z0-9_-]{{0,63}}"
        )
    return name


def signature(folder: Path) -> Signature:
    entries = []
    for name in _SIGNATURE_FILES:
        try:
            stat = (folder / name).stat()
        except FileNotFoundError:
            continue
        entries.append((name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


@dataclass(frozen=True)
class AdapterLocation:
    name: str
    folder: Path
    root: Path


class AdapterStore:
    def __init__(self, roots: Sequence[str | os.PathLike[str]]) -> None:
        if not roots:
            raise ValueError("at least one adapter root is needed")
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def names(self) -> list[str]:
        """Adapter names present on disk (folders with an adapter_config.json)."""
        found: set[str] = set()
        for root in self.roots:
            if not root.is_dir():
                continue
            for child in root.iterdir():
                if ADAPTER_NAME_RE.fullmatch(child.name) and (child / ADAPTER_CONFIG_FILE).exists():
                    found.add(child.name)
        return sorted(found)

    def locate(self, name: str) -> AdapterLocation:
        """The folder of adapter ``name``; the first root that has it wins."""
        validate_name(name)
        for root in self.roots:
            candidate = root / name
            if not candidate.exists():
                continue
            real = candidate.resolve()
            if not real.is_relative_to(root):
                raise AdapterRefused(f"adapter '{name}' is a link leading outside its root")
            for file in _SIGNATURE_FILES:
                target = candidate / file
                if target.is_symlink() and not target.resolve().is_relative_to(root):
                    raise AdapterRefused(f"adapter '{name}': {file} links outside its root")
            return AdapterLocation(name, real, root)
        available = self.names()
        listing = ", ".join(available[:20]) + (" ..." if len(available) > 20 else "")
        raise AdapterNotFound(
            f"no adapter named '{name}' (available: {listing or 'none'})"
        )
