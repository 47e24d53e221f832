"""The simulation ledger of a study: which ids were handed out, how often, and how each ended.

Simulation ``i`` always gets the same parameters and seed (the sampler's ``i``-th draw and
``simulation_seeds(seed, [i])``), whoever runs it and however often. The ledger writes every
hand-out and every outcome to a journal in the study's directory as it happens (one JSON line,
flushed: it survives the driver being killed, not the machine losing power), and a resumed study
replays that journal through a fresh ledger to stand exactly where the dead driver stood: the same
sampler position, the same attempts, the same done and given-up ids.
"""

from __future__ import annotations

import json
import threading
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from services.sampling import Sampler, simulation_seeds

OUTCOMES = ("done", "failed", "cancelled", "interrupted")


class LedgerError(RuntimeError):
    """A journal that cannot be read back (not this study's, or damaged before its last line)."""


@dataclass(frozen=True)
class Assignment:
    """Simulations handed out together: ``ids [n]``, ``params [n, P]``, ``seeds [n]``, ``attempts [n]`` (1 = first)."""

    ids: np.ndarray
    params: np.ndarray
    seeds: np.ndarray
    attempts: np.ndarray


class SimulationIds:
    """The one sequence of simulation ids of a study, shared by its solver actors and external clients.

    Fresh ids are drawn in order; a failed id that is re-queued is handed out again, alone and before
    any fresh one, with the parameters it had. An id is handed out at most ``max_attempts`` times; an
    id given up is replaced by a fresh one (``budget`` grows by one, up to twice the initial budget).
    With ``journal``, every change is appended to that file (see ``replay``). Thread-safe.
    """

    def __init__(
        self, sampler: Sampler, seed: int, budget: int, max_attempts: int = 3, journal: str | Path | None = None
    ) -> None:
        self._sampler = sampler
        self._seed = seed
        self.budget = budget
        self.max_attempts = max_attempts
        self._lock = threading.Lock()
        self._next = 0
        self._requeued: deque[int] = deque()
        self._params: dict[int, np.ndarray] = {}  # ids out or re-queued -> their parameters
        # An adaptive sampler learns from the losses of simulations settled long ago: keep every id's point.
        self._points: dict[int, np.ndarray] | None = {} if getattr(sampler, "adaptive", False) else None
        self._attempts: Counter[int] = Counter()
        self._out: dict[int, str] = {}  # id -> source, handed out and not settled yet
        self.abandoned = 0  # ids given up (failed on every attempt); each is replaced by a fresh draw
        self._max_budget = 2 * budget  # replacements stop there: a study that fails that much has a cause
        self.counts: Counter[str] = Counter()  # settled ids by outcome, and "retried" (handed out again)
        self.done: list[int] = []  # ids that completed, in the order they did
        self._journal: IO[str] | None = None
        if journal is not None:
            Path(journal).parent.mkdir(parents=True, exist_ok=True)
            self._journal = open(journal, "a", encoding="utf-8")

    def _log(self, record: dict[str, Any]) -> None:
        if self._journal is not None:
            # Flushed line by line: the kernel keeps it when the process is killed.
            self._journal.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._journal.flush()

    def close(self) -> None:
        with self._lock:
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def take(self, n: int, source: str) -> Assignment | None:
        """Up to ``n`` simulations (re-queued ones first), or None when there is none to hand out now."""
        with self._lock:
            got = self._take(n, source)
            if got is None:
                return None
            ids, params, attempts, fresh = got
            record: dict[str, Any] = {"take": n, "source": source}
            if self._points is not None and len(fresh):
                # What an adaptive sampler drew depended on losses a replay cannot see again: journal the points.
                record["fresh"] = fresh.tolist()
            self._log(record)
        return Assignment(ids, params, simulation_seeds(self._seed, ids), attempts)

    def _take(
        self, n: int, source: str, given: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """``given``: the fresh points a journal recorded (replay of an adaptive sampler), instead of drawing."""
        ids: list[int] = []
        if self._requeued:
            # A retry runs alone: a simulation that crashes its process fails only itself, and the
            # others of its batch go through on their next attempt.
            ids.append(self._requeued.popleft())
            n = 1
        fresh = min(n - len(ids), self.budget - self._next)
        drawn = np.empty((0, 0))
        if fresh > 0:
            new = range(self._next, self._next + fresh)
            if given is not None:
                drawn = np.asarray(given, dtype=np.float64).reshape(fresh, -1)
            else:
                drawn = self._sampler.draw(fresh)
            for i, p in zip(new, drawn, strict=True):
                self._params[i] = p
                if self._points is not None:
                    self._points[i] = p
            ids.extend(new)
            self._next += fresh
        if not ids:
            return None
        for i in ids:
            self._attempts[i] += 1
            self._out[i] = source
        arr = np.asarray(ids, dtype=np.int64)
        params = np.stack([self._params[i] for i in ids])
        attempts = np.asarray([self._attempts[i] for i in ids], dtype=np.int64)
        return arr, params, attempts, drawn

    def add(self, params: np.ndarray, source: str) -> Assignment:
        """A simulation of given parameters ``params [P]`` (one a user asked for), on top of the budget: the
        next fresh id, handed out to ``source`` at once. Journaled with its point, so a replay stands here too."""
        p = self._sampler.space.check(np.asarray(params, dtype=np.float64).reshape(1, -1))[0]
        with self._lock:
            self._log({"add": p.tolist(), "source": source})
            i = self._add(p, source)
        return Assignment(np.array([i], np.int64), p[None], simulation_seeds(self._seed, [i]), np.array([1]))

    def _add(self, p: np.ndarray, source: str) -> int:
        i = self._next
        self._next += 1
        self.budget += 1
        self._max_budget += 1
        self._params[i] = p
        if self._points is not None:
            self._points[i] = p
        self._attempts[i] += 1
        self._out[i] = source
        return i

    def observe(self, sim_ids: np.ndarray, losses: np.ndarray) -> int:
        """Per-simulation training losses for an adaptive sampler (its next draws depend on them).

        Ids this ledger never handed out and non-finite losses (a diverged step) are dropped; returns how
        many were passed on."""
        if self._points is None:
            return 0
        ids = np.asarray(sim_ids, dtype=np.int64).reshape(-1)
        loss = np.asarray(losses, dtype=np.float64).reshape(-1)
        with self._lock:
            keep = [k for k, i in enumerate(ids) if int(i) in self._points and np.isfinite(loss[k]) and loss[k] >= 0]
            if not keep:
                return 0
            params = np.stack([self._points[int(ids[k])] for k in keep])
            self._sampler.observe(params, loss[keep])
        return len(keep)

    def settle(self, ids: np.ndarray | list[int], outcome: str, requeue: bool = False) -> list[int]:
        """``outcome`` ``done``, ``failed``, ``cancelled`` or ``interrupted`` (handed out but never run: re-queued,
        no attempt counted); failed ids are re-queued when ``requeue`` and they have attempts left.
        Returns the re-queued ids. Ids not out (settled already) are ignored."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
        with self._lock:
            mine = [int(v) for v in ids if int(v) in self._out]
            if not mine:
                return []
            self._log({"settle": mine, "outcome": outcome, "requeue": requeue})
            return self._settle(mine, outcome, requeue)

    def _settle(self, ids: list[int], outcome: str, requeue: bool) -> list[int]:
        again: list[int] = []
        for i in ids:
            if self._out.pop(i, None) is None:
                continue
            if outcome == "interrupted":  # never ran (its call was queued on an actor that died)
                self._attempts[i] -= 1
                self._requeued.append(i)
                again.append(i)
                continue
            if outcome == "failed" and requeue and self._attempts[i] < self.max_attempts:
                self._requeued.append(i)
                again.append(i)
                self.counts["retried"] += 1
                continue
            self._params.pop(i, None)
            self.counts[outcome] += 1
            if outcome == "done":
                self.done.append(i)
            if outcome == "failed":
                self.abandoned += 1
                # A new parameter point is drawn in its place (the next fresh id).
                self.budget = min(self.budget + 1, self._max_budget)
        return again

    @classmethod
    def replay(
        cls, journal: str | Path, sampler: Sampler, seed: int, budget: int, max_attempts: int = 3
    ) -> SimulationIds:
        """The ledger a journal describes, writing on to the same journal.

        Simulations that were out when the journal ends (running when the driver died) never
        completed: they are re-queued without counting the attempt they were on, so that the
        resumed study runs them again and runs no completed one again.
        """
        ledger = cls(sampler, seed, budget, max_attempts)
        path = Path(journal)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise LedgerError(f"cannot read the simulation ledger {path}: {e}") from None
        for k, line in enumerate(lines):
            try:
                rec = json.loads(line)
                if "add" in rec:
                    ledger._add(np.asarray(rec["add"], dtype=np.float64), str(rec["source"]))
                elif "take" in rec:
                    given = rec.get("fresh")
                    if ledger._points is not None and given is None:
                        given = np.empty((0, sampler.space.dim))  # a retry alone: no fresh point
                    if ledger._take(int(rec["take"]), str(rec["source"]), given) is None:
                        raise ValueError("a hand-out that the ledger has nothing for")
                else:
                    ledger._settle([int(i) for i in rec["settle"]], str(rec["outcome"]), bool(rec["requeue"]))
            except (ValueError, KeyError, TypeError) as e:
                if k == len(lines) - 1:
                    # A last line cut short by the kill never took effect anywhere else either: drop it, so
                    # that the lines appended from now on stand on lines of their own.
                    tmp = path.with_suffix(".tmp")
                    tmp.write_text("".join(f"{ln}\n" for ln in lines[:-1]), encoding="utf-8")
                    tmp.replace(path)
                    break
                raise LedgerError(f"{path}, line {k + 1}: {e}") from None
        running = sorted(ledger._out)
        ledger._settle(running, "interrupted", False)
        ledger._journal = open(path, "a", encoding="utf-8")
        if running:
            ledger._log({"settle": running, "outcome": "interrupted", "requeue": False})
        return ledger

    def outstanding(self, source: str | None = None) -> int:
        """Simulations handed out (to ``source``, or to anyone) and not settled yet."""
        with self._lock:
            return sum(1 for s in self._out.values() if source is None or s == source)

    def is_out(self, sim_id: int) -> bool:
        with self._lock:
            return sim_id in self._out

    @property
    def exhausted(self) -> bool:
        """Every fresh id handed out and none waiting to be handed out again."""
        with self._lock:
            return self._next >= self.budget and not self._requeued

    @property
    def handed_out(self) -> int:
        """Distinct ids handed out so far."""
        with self._lock:
            return self._next
