"""The models being served: loaded once, swapped in when the store's served alias moves.

A request takes a reference to one ``LoadedModel`` and keeps it for its whole life, so a
swap never affects an in-flight request; the old model is freed when the last one ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from services import metrics as M
from trainer.ensemble import mean_std
from trainer.store import LoadedModel, ModelStore, StoreError

PINNED_KEPT = 4  # older versions kept loaded for clients that pin one
REJECTED_RETRY_S = 30.0

log = logging.getLogger("surge.gateway")


def run_model(m: LoadedModel, rows: np.ndarray, fields: np.ndarray | None = None) -> np.ndarray:
    """Predict fields ``[N, C_out, *grid]`` float32 (an ensemble's mean).

    Parametric: ``rows [N, P+1]`` (physical parameters in card order, then t). Operator:
    ``fields [N, C_in, *grid]`` and ``rows [N, P]`` (the parameters, possibly none).
    """
    return run_model_std(m, rows, fields)[0]


def run_model_std(
    m: LoadedModel, rows: np.ndarray, fields: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(mean, std)`` ``[N, C_out, *grid]`` float32: ``std`` is the ensemble's calibrated standard deviation
    (the members' spread times the card's ``std_scale``), ``None`` for a single model."""
    spec, norm = m.spec, m.normaliser
    if spec.field_input:
        assert fields is not None
        x = torch.from_numpy(spec.encode_fields(fields, rows))  # (N, C_in+P, *grid)
    else:
        x = torch.from_numpy(spec.encode_inputs(rows[:, :-1], rows[:, -1]))  # (N, P+2)
    with torch.inference_mode():
        y = norm.decode(m.model(norm.encode_x(x)))  # (N, C_out, *grid), (K, N, C_out, *grid) for an ensemble
        if m.card.ensemble is None:
            return y.numpy().astype(np.float32, copy=False), None
        mean, spread = mean_std(y)
        std = spread * m.card.ensemble.std_scale
    return mean.numpy().astype(np.float32, copy=False), std.numpy().astype(np.float32, copy=False)


def check_servable(m: LoadedModel) -> None:
    """Predict once at the centre of the parameter box; a checkpoint that cannot is not served."""
    try:
        spec = m.spec
        mid = (np.asarray(spec.params.low) + np.asarray(spec.params.high)) / 2
        if spec.field_input:
            y, std = run_model_std(m, mid[None], np.zeros((1, len(spec.inputs), *spec.grid), np.float32))
        else:
            y, std = run_model_std(m, np.concatenate([mid, [spec.t_final]])[None])
    except Exception as e:  # any failure here would otherwise become a 500 on every request
        raise StoreError(f"{m.name} version {m.version} cannot predict: {type(e).__name__}: {e}") from None
    if y.shape != (1, *spec.out_shape) or tuple(y.shape[1:]) != m.card.output_shape:
        raise StoreError(f"{m.name} version {m.version} predicts shape {list(y.shape[1:])}, card says otherwise")
    if not np.all(np.isfinite(y)) or (std is not None and not np.all(np.isfinite(std))):
        raise StoreError(f"{m.name} version {m.version} predicts non-finite values")


class ModelHub:
    def __init__(self, store_root: Path, poll_interval_s: float = 1.0) -> None:
        self.store = ModelStore(store_root)
        self.poll_interval_s = poll_interval_s
        self._models: dict[str, LoadedModel] = {}
        # Newest version found unservable, per name, and when: tried again after REJECTED_RETRY_S (the
        # cause may pass: a shared volume that had not synced every file yet).
        self._rejected: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._pinned: OrderedDict[tuple[str, int], LoadedModel] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def get(self, name: str) -> LoadedModel | None:
        """The newest loaded version of ``name``; looks in the store first if none is loaded yet."""
        m = self._models.get(name)
        if m is None:
            self.refresh(name)
            m = self._models.get(name)
        return m

    def get_version(self, name: str, version: int) -> LoadedModel | None:
        """A given version of ``name`` (pinned by a client for reproducible predictions), or None.

        Older versions are loaded on demand and a few are kept, so that a client pinning one does
        not reload it for every request.
        """
        cur = self._models.get(name)
        if cur is not None and cur.version == version:
            return cur
        key = (name, int(version))
        with self._lock:
            hit = self._pinned.get(key)
            if hit is not None:
                self._pinned.move_to_end(key)
                return hit
        if version < 1 or version not in self.store.versions(name):
            return None
        try:
            loaded = self.store.load(name, version)
            check_servable(loaded)
        except StoreError as e:
            log.warning("not serving %s version %d: %s", name, version, e)
            return None
        with self._lock:
            self._pinned[key] = loaded
            while len(self._pinned) > PINNED_KEPT:
                self._pinned.popitem(last=False)
        return loaded

    def names(self) -> list[str]:
        return sorted(set(self._models) | set(self.store.names()))

    def served_names(self) -> list[str]:
        """The names a version is loaded for, from memory (no store access: safe on the event loop)."""
        return sorted(self._models)

    def refresh(self, name: str | None = None) -> None:
        """Load any newer version found in the store (all names, or one)."""
        for n in [name] if name else self.store.names():
            latest = self.store.serving(n)
            current = self._models.get(n)
            if latest is None or (current is not None and current.version == latest):
                continue
            rejected = self._rejected.get(n)
            if rejected is not None and rejected[0] == latest and time.monotonic() - rejected[1] < REJECTED_RETRY_S:
                continue
            try:
                loaded = self.store.load(n, latest)
                check_servable(loaded)
            except StoreError as e:
                # A broken checkpoint must not take down what is being served.
                self._rejected[n] = (latest, time.monotonic())
                log.warning("not serving %s: %s (tried again in %.0f s)", n, e, REJECTED_RETRY_S)
                continue
            with self._lock:
                cur = self._models.get(n)
                if cur is None or cur.version != loaded.version:
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
