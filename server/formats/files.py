"""Reading settings files and writing files atomically, the same way everywhere."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from server.errors import InvalidOption


def read_yaml_mapping(path: str | os.PathLike[str], label: str) -> dict[str, Any]:
    """The top-level mapping of a YAML file (empty file: ``{}``); ``InvalidOption``
    naming ``label`` and the problem otherwise (missing, unreadable, not YAML, a list)."""
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidOption(f"{label} {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidOption(f"{label} {file} cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        raise InvalidOption(f"{label} {file}: not valid YAML "
                            f"({str(exc).splitlines()[0][:80]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidOption(f"{label} {file}: top level must be a mapping")
    return data


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``target``, fsync, then ``os.replace``:
    readers see the old file or the whole new one, never a part."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def replace_marked_block(doc: Path, begin: str, end: str, block: str,
                         heading: str = "") -> None:
    """Put ``block`` (which starts with ``begin`` and ends with ``end``) where those
    markers are in ``doc`` (generated tables in the docs), or append it under
    ``heading``."""
    text = doc.read_text(encoding="utf-8")
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + (f"\n\n## {heading}\n\n" if heading else "\n\n") + block + "\n"
    doc.write_text(text, encoding="utf-8")
