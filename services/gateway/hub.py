"""The models being served: loaded once, swapped in when the store holds a newer version.

A request takes a reference to one ``LoadedModel`` and keeps it for its whole life, so a
swap never affects an in-flight request; the old model is freed when the last one ends.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from services import metrics as M
from trainer.store import LoadedModel, ModelStore, StoreError

log = logging.getLogger("surge.gateway")


class ModelHub:
    def __init__(self, store_root: Path, poll_interval_s: float = 1.0) -> None:
        self.store = ModelStore(store_root)
        self.poll_interval_s = poll_interval_s
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, name: str) -> LoadedModel | None:
        """The newest loaded version of ``name``; looks in the store first if none is loaded yet."""
        m = self._models.get(name)
        if m is None:
            self.refresh(name)
            m = self._models.get(name)
        return m

    def names(self) -> list[str]:
        return sorted(set(self._models) | set(self.store.names()))

    def refresh(self, name: str | None = None) -> None:
        """Load any newer version found in the store (all names, or one)."""
        for n in [name] if name else self.store.names():
            latest = self.store.latest(n)
            current = self._models.get(n)
            if latest is None or (current is not None and current.version >= latest):
                continue
            try:
                loaded = self.store.load(n, latest)
            except StoreError as e:
                # A broken checkpoint must not take down what is being served.
                log.warning("not serving %s: %s", n, e)
                continue
            with self._lock:
                cur = self._models.get(n)
                if cur is None or cur.version < loaded.version:
                    self._models[n] = loaded
                    M.MODEL_VERSION.labels(n).set(loaded.version)
                    log.info("serving %s version %d", n, loaded.version)

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._watch, name="model-hub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.refresh()
            except Exception:  # keep watching whatever happens to one scan
                log.exception("model store scan failed")
