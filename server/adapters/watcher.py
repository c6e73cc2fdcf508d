"""The watcher: notices added, changed and removed adapter folders and tells the cache.

The server's poller calls :meth:`AdapterWatcher.poll_now` every ``poll_interval_s``. A
folder whose signature (names, sizes, mtimes) differs from the version being served is
loaded anew, beside the old version (the cache swaps them when the new one is ready); a
folder whose last load was refused is retried only when its files change; a folder that
is gone is retired. A folder without a manifest that changed is given one more poll to
settle, since nothing marks its writing as finished.
"""

from __future__ import annotations

import logging

from server.adapters.cache import AdapterCache
from server.adapters.store import Signature, signature
from server.errors import SwitchboardError
from server.formats.manifest import MANIFEST_FILE

log = logging.getLogger(__name__)


class AdapterWatcher:
    def __init__(self, cache: AdapterCache) -> None:
        self.cache = cache
        self._unsettled: dict[str, Signature] = {}
        """Manifest-less folders seen changed once: loaded if the next poll sees the same."""

    def poll_now(self) -> None:
        store = self.cache.store
        on_disk = set(store.names())
        known = self.cache.watched()
        for name in sorted(set(known) - on_disk):
            self._retire(name)
        for name in sorted(set(known) & on_disk):
            served, refused, loading = known[name]
            try:
                folder = store.locate(name).folder
            except SwitchboardError:
                self._retire(name)
                continue
            sig = signature(folder)
            if loading or sig in (served, refused):
                continue
            has_manifest = any(f == MANIFEST_FILE for f, _, _ in sig)
            if not has_manifest and self._unsettled.get(name) != sig:
                self._unsettled[name] = sig  # still being written? wait one more poll
                continue
            self._unsettled.pop(name, None)
            try:
                self.cache.refresh(name)
            except SwitchboardError as exc:
                log.warning("adapter %s: reload not started: %s", name, exc)

    def _retire(self, name: str) -> None:
        self._unsettled.pop(name, None)
        self.cache.retire(name)
