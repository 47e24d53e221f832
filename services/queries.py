"""Where users ask: a bounded sample of the parameter points predicted, per model, for studies to revisit.

The gateway ``record``s the parameters of every successful parametric prediction into a per-name
reservoir (``QueryBook``) and now and then ``flush``es it into ``<root>/<name>/queries.json`` in the
model store, merged with what other gateway replicas sharing the store wrote there, so the file stays
one bounded, uniform sample of all their queries. A study (another process, maybe another node) reads
the file (``read_queries``) and a ``QuerySampler`` mixes those points, slightly jittered, into its
simulation draws: simulations go where users ask.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from solvers.base import ParamSpace

log = logging.getLogger("surge.queries")

# The store's name rule (trainer/store.py), repeated so that this module does not pull in torch: a name
# that does not match never reaches the filesystem ("..", "a/b").
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

QUERIES = "queries.json"  # <root>/<name>/queries.json: {"format", "names", "seen", "points"}
QUERIES_LOCK = ".queries.lock"  # flocked while a gateway merges into queries.json
FORMAT = "surge-queries"
MAX_CAPACITY = 1_000_000
# numpy's hypergeometric refuses populations this large; beyond it the binomial is indistinguishable.
_HYPERGEOMETRIC_MAX = 10**9


def _check_int(name: str, value: Any, least: int, most: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if most is not None and value > most:
        raise ValueError(f"{name} must be an integer in [{least}, {most}], got {value!r}")
    return int(value)


def _is_number(value: Any) -> bool:
    """A real number, finite; ``True`` and ``False`` are not numbers here."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float | np.integer | np.floating)
        and bool(np.isfinite(value))
    )


def _check_seconds(name: str, value: Any) -> float:
    if not (_is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


def _hypergeometric(rng: np.random.Generator, good: int, bad: int, m: int) -> int:
    """How many of ``m`` drawn without replacement from ``good + bad`` items are good."""
    if good == 0 or bad == 0:
        return m if bad == 0 else 0
    if good < _HYPERGEOMETRIC_MAX and bad < _HYPERGEOMETRIC_MAX:
        return int(rng.hypergeometric(good, bad, m))
    return int(rng.binomial(m, good / (good + bad)))


class QueryReservoir:
    """A uniform sample of at most ``capacity`` of all the points ever offered (Vitter's Algorithm R).

    Thread-safe. The buffer grows on demand up to ``capacity`` rows and never beyond, so memory is
    bounded whatever is offered. All points must share one dimension until ``clear()``.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = _check_int("capacity", capacity, 1, MAX_CAPACITY)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._buf: np.ndarray | None = None  # [rows, P], rows <= capacity; the first _m rows hold the sample
        self._m = 0
        self._seen = 0

    @property
    def seen(self) -> int:
        """Points offered so far (merged reservoirs count what the other side had seen)."""
        with self._lock:
            return self._seen

    @property
    def dim(self) -> int | None:
        """The points' dimension, ``None`` while the reservoir is empty."""
        with self._lock:
            return None if self._buf is None else self._buf.shape[1]

    def __len__(self) -> int:
        with self._lock:
            return self._m

    def points(self) -> np.ndarray:
        """A copy of the sample ``[m, P]`` (``(0, 0)`` while empty), in no meaningful order."""
        with self._lock:
            return np.empty((0, 0)) if self._buf is None else self._buf[: self._m].copy()

    def clear(self) -> None:
        """Forget every point and the count; the next points may have another dimension."""
        with self._lock:
            self._buf = None
            self._m = 0
            self._seen = 0

    def _check(self, points: np.ndarray, what: str) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        if p.ndim != 2:
            raise ValueError(f"{what} must have shape [n, P], got {list(p.shape)}")
        if self._buf is not None and len(p) and p.shape[1] != self._buf.shape[1]:
            raise ValueError(f"{what} must have shape [n, {self._buf.shape[1]}], got {list(p.shape)}")
        return p

    def _reserve(self, rows: int, dim: int) -> np.ndarray:
        """A buffer of at least ``rows`` (<= capacity) rows holding the current sample."""
        if self._buf is None:
            self._buf = np.empty((min(self.capacity, max(rows, 16)), dim))
        elif len(self._buf) < rows:
            grown = np.empty((min(self.capacity, max(rows, 2 * len(self._buf))), dim))
            grown[: self._m] = self._buf[: self._m]
            self._buf = grown
        return self._buf

    def offer(self, points: np.ndarray) -> None:
        """Offer each row of ``points [n, P]``; afterwards every point seen is kept with the same probability."""
        with self._lock:
            p = self._check(points, "points")
            n = len(p)
            if n == 0:
                return
            fill = min(n, self.capacity - self._m)
            buf = self._reserve(self._m + fill, p.shape[1])
            buf[self._m : self._m + fill] = p[:fill]
            self._m += fill
            rest = p[fill:]
            if len(rest):
                # Point number t (0-based, over everything seen) replaces a random slot with probability
                # capacity / (t + 1): one draw of j in [0, t] per point, vectorised.
                t = self._seen + fill + np.arange(len(rest), dtype=np.int64)
                j = self._rng.integers(0, t + 1)
                hit = np.flatnonzero(j < self.capacity)
                if len(hit):
                    # Within one batch a later point replacing the same slot wins, as in the sequential
                    # algorithm; numpy does not promise an order for repeated fancy-index assignment.
                    slots, last = np.unique(j[hit][::-1], return_index=True)
                    buf[slots] = rest[hit[::-1][last]]
            self._seen += n

    def merge(self, other_points: np.ndarray, other_seen: int) -> None:
        """Fold in another reservoir's sample ``[b, P]`` of its ``other_seen`` points.

        The result is a uniform sample of ``min(capacity, m + b)`` of both populations together: how
        many come from each side is hypergeometric (each slot from a side with probability in proportion
        to the points that side has seen and not yet given), each side sampled without replacement.
        Exact when each side holds at least the points asked of it, as two reservoirs of this capacity
        always do; otherwise the short side gives all it has.
        """
        with self._lock:
            o = self._check(other_points, "other_points")
            seen = _check_int("other_seen", other_seen, len(o))
            a, b = self._m, len(o)
            if b == 0:  # nothing to take; the other side's points still count as seen
                self._seen += seen
                return
            m = min(self.capacity, a + b)
            x = _hypergeometric(self._rng, self._seen, seen, m)
            x = min(max(x, m - b), a)  # a short side (smaller capacity elsewhere) gives all it has
            mine = self._buf[self._rng.choice(a, x, replace=False)] if x else np.empty((0, o.shape[1]))
            theirs = o[self._rng.choice(b, m - x, replace=False)]
            merged = np.concatenate([mine, theirs])  # [m, P]
            self._buf = merged[self._rng.permutation(m)]
            self._m = m
            self._seen += seen


def _parse(obj: Any) -> tuple[np.ndarray, list[str], int]:
    """A queries file's ``(points [m, P], names, seen)``, or ``ValueError`` saying what is wrong."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT!r} file")
    names = obj.get("names")
    if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
        raise ValueError("names must be a list of strings")
    seen = obj.get("seen")
    if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
        raise ValueError(f"seen must be an integer >= 0, got {seen!r}")
    raw = obj.get("points")
    if not isinstance(raw, list):
        raise ValueError("points must be a list of rows")
    try:
        points = np.asarray(raw, dtype=np.float64) if raw else np.empty((0, len(names)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"points are not a numeric table: {e}") from None
    if points.ndim != 2 or (names and points.shape[1] != len(names)):
        raise ValueError(f"points must have shape [m, {len(names)}], got {list(points.shape)}")
    if not np.all(np.isfinite(points)):
        raise ValueError("points must be finite")
    if len(points) > seen:
        raise ValueError(f"{len(points)} points but only {seen} seen")
    return points, names, seen


def read_queries(root: str | os.PathLike[str], name: str) -> tuple[np.ndarray, list[str], int]:
    """The query sample stored for ``name``: ``(points [m, P], parameter names, points seen)``.

    ``(empty (0, 0), [], 0)`` when there is none or it cannot be read: a study polls this, and a
    missing or damaged file only means no points to revisit (the gateway replaces a damaged one)."""
    none: tuple[np.ndarray, list[str], int] = (np.empty((0, 0)), [], 0)
    if not isinstance(name, str) or not _NAME.match(name):
        return none
    try:
        return _parse(json.loads((Path(root) / name / QUERIES).read_text()))
    except FileNotFoundError:
        return none
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.debug("cannot read the queries of %r: %s", name, e)
        return none


def query_source(root: str | os.PathLike[str], name: str, space: ParamSpace) -> Callable[[], np.ndarray]:
    """A ``QuerySampler`` source reading ``name``'s queries, empty unless they were asked in ``space``'s
    parameters (a model of the same name trained on another problem takes other inputs)."""

    def source() -> np.ndarray:
        points, names, _ = read_queries(root, name)
        if names != list(space.names) or points.shape[1:] != (space.dim,):
            return np.empty((0, space.dim))
        return points

    return source


@contextmanager
def _flock(path: Path) -> Iterator[None]:
    """Serialise merges into one name's queries file across processes and nodes sharing the store."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str) -> None:
    # Per process and thread, so that no two writers share a temporary file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text)
        os.chmod(tmp, 0o644)  # a study running under another uid must read it, whatever our umask
        os.replace(tmp, path)  # readers see the old sample or the new one, never half of one
    finally:
        tmp.unlink(missing_ok=True)


@dataclass
class _Entry:
    reservoir: QueryReservoir  # points recorded since the last flush
    names: list[str]  # their parameter names ([] when not given)


class QueryBook:
    """The gateway's per-name reservoirs of queried parameter points, flushed into the model store.

    ``record`` is cheap (O(n) under one lock) and never raises on bad input: a query that cannot be
    kept is simply not kept. ``flush`` merges each name's new points into ``<root>/<name>/queries.json``
    under a file lock, so that several gateways sharing the store end with one bounded uniform sample
    of all their queries. At most ``max_names`` names are held between flushes, so a flood of requests
    for many names cannot grow memory beyond ``max_names * capacity`` points.

    Replicas should get different seeds: with the same seed their reservoirs make the same choices.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        capacity: int = 1024,
        flush_s: float = 5.0,
        seed: int = 0,
        max_names: int = 256,
    ) -> None:
        self.root = Path(root)
        self.capacity = _check_int("capacity", capacity, 1, MAX_CAPACITY)
        self.flush_s = _check_seconds("flush_s", flush_s)
        self.max_names = _check_int("max_names", max_names, 1)
        self._seeds = np.random.SeedSequence(seed)
        self._rng = np.random.default_rng(self._seeds.spawn(1)[0])  # seeds of the merge reservoirs
        self._lock = threading.Lock()  # guards _entries and each entry
        self._flush_lock = threading.Lock()  # one flush at a time: the poll thread and a shutdown may race
        self._entries: dict[str, _Entry] = {}
        self._full_logged = False
        self._last_flush = time.monotonic()

    def _new_seed(self) -> int:
        return int(self._rng.integers(2**63))

    def names(self) -> list[str]:
        """Names holding points not flushed yet."""
        with self._lock:
            return sorted(self._entries)

    def pending(self, name: str) -> tuple[np.ndarray, int]:
        """The points of ``name`` not flushed yet ``[m, P]`` and how many were recorded."""
        with self._lock:
            e = self._entries.get(name)
            return (e.reservoir.points(), e.reservoir.seen) if e is not None else (np.empty((0, 0)), 0)

    def record(self, name: str, params: np.ndarray, names: Sequence[str] | None = None) -> None:
        """Keep a sample of the parameter sets ``params [n, P]`` asked of model ``name``.

        ``names`` are the parameters' names, in order: a file holding other names is replaced rather
        than merged at the next flush. Rows that are not finite are dropped; a bad name, shape or
        ``names`` of the wrong length drops the call."""
        if not isinstance(name, str) or not _NAME.match(name):
            return
        try:
            p = np.asarray(params, dtype=np.float64)
        except (TypeError, ValueError):
            return
        labels = [str(s) for s in names] if names is not None else []
        if p.ndim != 2 or p.shape[1] == 0 or (labels and len(labels) != p.shape[1]):
            return
        p = p[np.isfinite(p).all(axis=1)]
        if not len(p):
            return
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                if len(self._entries) >= self.max_names:
                    if not self._full_logged:
                        log.warning("query book holds %d names already; ignoring queries of new ones", self.max_names)
                        self._full_logged = True
                    return
                e = self._entries[name] = _Entry(QueryReservoir(self.capacity, self._new_seed()), labels)
            if e.names != labels or e.reservoir.dim not in (None, p.shape[1]):
                # The model was replaced by one with other inputs: its old queries mean nothing to it.
                e.reservoir.clear()
                e.names = labels
            e.reservoir.offer(p)

    def maybe_flush(self) -> int:
        """``flush()`` if ``flush_s`` have passed since the last one; the names written (0 if not due)."""
        if time.monotonic() - self._last_flush < self.flush_s:
            return 0
        return self.flush()

    def flush(self) -> int:
        """Merge every name's new points into its queries file; returns how many files were written.

        Never raises: a name that cannot be written keeps its points for the next flush."""
        with self._flush_lock:
            self._last_flush = time.monotonic()
            with self._lock:
                batch = [(n, e.names, e.reservoir.points(), e.reservoir.seen) for n, e in self._entries.items()]
                # Flushed names are dropped from memory, so max_names bounds the names between two flushes.
                self._entries.clear()
                self._full_logged = False
            written = 0
            for name, labels, points, seen in batch:
                try:
                    written += self._write(name, labels, points, seen)
                except Exception as e:  # a full disk, a lock on a dead NFS server: never out of the poll thread
                    log.warning("cannot write the queries of %r (%s: %s); keeping them", name, type(e).__name__, e)
                    self._restore(name, labels, points, seen)
            return written

    def _restore(self, name: str, labels: list[str], points: np.ndarray, seen: int) -> None:
        """Put back the points of a failed flush, merged with those recorded since."""
        with self._lock:
            e = self._entries.get(name)
            if e is None:
                if len(self._entries) >= self.max_names:
                    return
                e = self._entries[name] = _Entry(QueryReservoir(self.capacity, self._new_seed()), labels)
            if e.names != labels or e.reservoir.dim not in (None, points.shape[1]):
                return  # newer queries with other parameters superseded these
            e.reservoir.merge(points, seen)

    def _write(self, name: str, labels: list[str], points: np.ndarray, seen: int) -> int:
        d = self.root / name
        if not d.is_dir():  # the model was deleted: its queries go with it
            return 0
        path = d / QUERIES
        with _flock(d / QUERIES_LOCK):
            merged = QueryReservoir(self.capacity, self._new_seed())
            old = self._read_for_merge(path, name)
            if old is not None:
                o_points, o_names, o_seen = old
                if o_names == labels and (not len(o_points) or o_points.shape[1] == points.shape[1]):
                    merged.merge(o_points, o_seen)
                else:
                    log.info("queries of %r were asked of other parameters %s; replacing them", name, o_names)
            merged.merge(points, seen)
            doc = {"format": FORMAT, "names": labels, "seen": merged.seen, "points": merged.points().tolist()}
            _write_atomic(path, json.dumps(doc))
        return 1

    @staticmethod
    def _read_for_merge(path: Path, name: str) -> tuple[np.ndarray, list[str], int] | None:
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s); replacing it", path, e)
            return None
        try:
            return _parse(json.loads(text))
        except ValueError as e:
            log.warning("queries file of %r is corrupt or foreign (%s); replacing it", name, e)
            return None


class QuerySampler:
    """Draws near the points users asked predictions for, and uniformly elsewhere.

    Of each draw of ``n``, ``round(fraction * n)`` points (none while there are no query points) are
    picked with replacement from the current query points (those outside the box dropped) and moved
    by a Gaussian jitter of std ``jitter`` in the unit cube, so relative to each parameter's range
    (redrawn up to 10 times if it leaves the box, then left unjittered; 0 repeats the queries
    exactly); the rest are uniform in the box, and the picked points land at random positions.
    ``source()`` (e.g. ``query_source``) gives the current points ``[m, P]``, and is called at most once
    every ``refresh_s`` seconds so that a study polls the queries file cheaply.
    """

    # Draws depend on what users asked, which no seed reproduces: the ledger journals the points drawn,
    # and a resumed study replays those rather than redrawing.
    adaptive = True
    kind = "queries"
    max_retries = 10

    def __init__(
        self,
        space: ParamSpace,
        seed: int = 0,
        source: Callable[[], np.ndarray] | None = None,
        fraction: float = 0.5,
        jitter: float = 0.01,
        refresh_s: float = 10.0,
    ) -> None:
        if not (_is_number(fraction) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"fraction must lie in [0, 1], got {fraction!r}")
        if not (_is_number(jitter) and jitter >= 0):
            raise ValueError(f"jitter must be finite and >= 0 (a fraction of each parameter's range), got {jitter!r}")
        if source is not None and not callable(source):
            raise ValueError(f"source must be callable or None, got {source!r}")
        self.space = space
        self.seed = seed
        self.source = source
        self.query_fraction = float(fraction)
        self.jitter = float(jitter)
        self.refresh_s = _check_seconds("refresh_s", refresh_s)
        # One generator for every random choice, so the same seed, points and calls give the same draws.
        self._rng = np.random.default_rng(seed)
        self._points = np.empty((0, space.dim))  # [m, P], inside the box
        self._fetched_at: float | None = None  # time.monotonic() of the last source() call
        self.queried = 0  # points drawn near a query so far

    @property
    def points(self) -> np.ndarray:
        """The query points drawn from ``[m, P]`` (a copy)."""
        return self._points.copy()

    def set_points(self, points: np.ndarray) -> None:
        """Draw near ``points [m, P]`` from now on; rows that are not finite or lie outside the box are dropped."""
        p = np.asarray(points, dtype=np.float64)
        if p.size == 0:
            p = p.reshape(0, self.space.dim)
        if p.ndim != 2 or p.shape[1] != self.space.dim:
            raise ValueError(
                f"points must have shape [m, {self.space.dim}] ({', '.join(self.space.names)}), got {list(p.shape)}"
            )
        lo = np.asarray(self.space.low)
        hi = np.asarray(self.space.high)
        keep = np.all(np.isfinite(p) & (p >= lo) & (p <= hi), axis=1)
        self._points = p[keep].copy()  # the caller may reuse its array

    def _refresh(self) -> None:
        if self.source is None:
            return
        now = time.monotonic()
        if self._fetched_at is not None and now - self._fetched_at < self.refresh_s:
            return
        self._fetched_at = now
        try:
            self.set_points(self.source())
        except Exception as e:  # a source that fails (file mid-rewrite on NFS, say) leaves the old points
            log.warning("query points unavailable (%s: %s); keeping the previous ones", type(e).__name__, e)

    def observe(self, params: np.ndarray, losses: np.ndarray) -> None:
        """Training losses per simulation: checked, then ignored (the queries alone steer the draws)."""
        p = self.space.check(params)
        loss = np.asarray(losses, dtype=np.float64)
        if loss.shape != (p.shape[0],):
            raise ValueError(f"losses must have shape [{p.shape[0]}] (one per parameter set), got {list(loss.shape)}")
        bad = ~(np.isfinite(loss) & (loss >= 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"losses[{i}] must be finite and >= 0, got {loss[i]}")

    def queried_fraction(self) -> float:
        """The fraction of the next draw taken near queries, with the points held now (0 without any).

        A refresh from ``source`` at the next draw may change it; this does not call the source."""
        return self.query_fraction if len(self._points) and self.space.dim else 0.0

    def draw(self, n: int) -> np.ndarray:
        """The next ``n`` parameter sets ``[n, P]``, all inside the box."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        n = int(n)
        self._refresh()
        k = round(self.queried_fraction() * n)
        where = self._rng.permutation(n)[:k]  # positions of the query draws
        out = np.minimum(self.space.scale(self._rng.random((n, self.space.dim))), self.space.high)  # [n, P]
        if k:
            out[where] = self._near_queries(k)
        self.queried += k
        return out

    def _near_queries(self, k: int) -> np.ndarray:
        """``k`` query points picked with replacement and jittered, in the box's own units ``[k, P]``."""
        base = self._points[self._rng.integers(0, len(self._points), size=k)]  # [k, P]
        if self.jitter == 0:
            return base  # exact repeats: no round trip through the unit cube
        lo = np.asarray(self.space.low)
        hi = np.asarray(self.space.high)
        step = self.jitter * (hi - lo)  # [P]
        moved = base + step * self._rng.standard_normal(base.shape)
        # Redraw rather than clip: clipping would pile points on the faces of the box. [lo, hi) is the
        # unit cube's [0, 1), the support of the uniform draws.
        out = ~np.all((moved >= lo) & (moved < hi), axis=1)
        for _ in range(self.max_retries):
            if not out.any():
                break
            moved[out] = base[out] + step * self._rng.standard_normal((int(out.sum()), base.shape[1]))
            out = ~np.all((moved >= lo) & (moved < hi), axis=1)
        moved[out] = base[out]
        return moved

    def state(self) -> dict[str, Any]:
        """Everything needed to continue the same sequence of draws (JSON-friendly)."""
        return {
            "seed": self.seed,
            "fraction": self.query_fraction,
            "jitter": self.jitter,
            "refresh_s": self.refresh_s,
            "queried": self.queried,
            "points": self._points.tolist(),
            "rng": self._rng.bit_generator.state,
        }

    @classmethod
    def from_state(
        cls, space: ParamSpace, state: dict[str, Any], source: Callable[[], np.ndarray] | None = None
    ) -> QuerySampler:
        """Rebuild a sampler from ``state()``; with the same points its next draws are the original's.

        With a ``source`` the first draw refreshes the points from it, as a resumed study should."""
        keys = ("seed", "fraction", "jitter", "refresh_s")
        sampler = cls(space, source=source, **{k: state[k] for k in keys})
        sampler.set_points(np.array(state["points"], dtype=np.float64).reshape(-1, space.dim))
        sampler.queried = int(state["queried"])
        sampler._rng.bit_generator.state = state["rng"]
        return sampler
