"""Leases: the simulations of one study handed out to external clients and not settled yet.

A lease is taken from the study's ``SimulationIds`` (the sequence the solver actors use too, re-queued
failures first) and settled once: ``done``, ``failed`` (re-queued while tries are left) or ``cancelled``
(the study ended). A lease never streamed within ``ingest.lease_s`` is failed (``reap``). At most one
stream carries a lease at a time (``claim`` / ``unclaim``). Whether the study still hands out
simulations (``open``) lives here too, under the same lock as the leases, so that none is handed out
after ``close`` has cancelled the rest."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from services.config import IngestConfig
from services.ingest.errors import Reject

if TYPE_CHECKING:
    from services.ingest.staging import StreamState

log = logging.getLogger("surge.ingest")


@dataclass
class Lease:
    """A simulation handed out to an external client and not settled yet."""

    sim_id: int
    params: np.ndarray  # (P,)
    seed: int
    attempt: int
    since: float  # time.monotonic() when handed out
    stream: StreamState | None = None  # the call streaming it, once one has begun


class Leases:
    """A study's leases and their counts; ``on_event(kind, sim_id, produced)`` hears every hand-out and settle."""

    def __init__(self, study_id: str, ids: Any, config: IngestConfig, on_event: Callable[..., None]) -> None:
        self.study_id = study_id
        self.ids = ids  # services.ledger.SimulationIds
        self.config = config
        self.on_event = on_event  # "assigned", "done", "failed", "cancelled"
        self.open = True
        self.closed_reason = ""
        self._lock = threading.Lock()
        self._out: dict[int, Lease] = {}
        self._streams = 0
        self._counts = {"assigned": 0, "done": 0, "failed": 0, "cancelled": 0, "rejected_streams": 0}

    @property
    def cap_reached(self) -> bool:
        cap = self.config.max_simulations
        return cap is not None and self._counts["done"] >= cap

    def hand_out(self) -> Lease:
        """The study's next simulation for an external client, or ``Reject`` saying why there is none now."""
        cap = self.config.max_simulations
        with self._lock:
            if not self.open:
                raise Reject(grpc.StatusCode.OUT_OF_RANGE, f"study {self.study_id} has ended: {self.closed_reason}")
            if self.cap_reached:
                raise Reject(
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"study {self.study_id} has all the external simulations it takes ({cap})",
                )
            if cap is not None and self._counts["done"] + len(self._out) >= cap:
                raise Reject(
                    grpc.StatusCode.ABORTED,
                    f"study {self.study_id}: its last external simulations are in flight and may still fail; "
                    "ask again later",
                )
            got = self.ids.take(1, "external")
            if got is None:
                if self.ids.outstanding() == 0:
                    raise Reject(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"study {self.study_id} has handed out all its {self.ids.budget} simulations",
                    )
                raise Reject(
                    grpc.StatusCode.ABORTED,
                    f"study {self.study_id}: no simulation free now; {self.ids.outstanding()} in flight may "
                    "still fail; ask again later",
                )
            lease = Lease(int(got.ids[0]), got.params[0], int(got.seeds[0]), int(got.attempts[0]), time.monotonic())
            self._out[lease.sim_id] = lease
            self._counts["assigned"] += 1
        self.on_event("assigned", lease.sim_id)
        return lease

    def get(self, sim_id: int) -> Lease | None:
        with self._lock:
            return self._out.get(sim_id)

    def claim(self, sim_id: int, st: StreamState) -> Lease:
        """``st`` streams ``sim_id`` now; ``Reject`` if it is not handed out or another call streams it."""
        with self._lock:
            lease = self._out.get(sim_id)
            if lease is None:
                raise self.not_out(sim_id)
            if lease.stream is not None:
                raise Reject(
                    grpc.StatusCode.FAILED_PRECONDITION, f"simulation {sim_id} is being streamed by another call"
                )
            lease.stream = st
            st.sim = lease
            self._streams += 1
        return lease

    def unclaim(self, st: StreamState, rejected: bool) -> None:
        """``st`` has ended (``rejected``: with an error); its lease, if still out, may be streamed again."""
        lease = st.sim
        if lease is None:
            return
        with self._lock:
            self._streams -= 1
            if rejected:
                self._counts["rejected_streams"] += 1
            if lease.stream is st:
                lease.stream = None

    def reap(self) -> None:
        """Simulations handed out but never streamed within ``lease_s`` are handed out again."""
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._out.values() if s.stream is None and now - s.since > self.config.lease_s]
        for lease in stale:
            log.warning("study %s: simulation %d was never streamed; handing it out again", self.study_id, lease.sim_id)
            self.settle(lease.sim_id, "failed", expect=lease)

    def not_out(self, sim_id: int) -> Reject:
        if self.ids.is_out(sim_id):
            return Reject(grpc.StatusCode.NOT_FOUND, f"simulation {sim_id} is run by a solver actor, not by you")
        return Reject(
            grpc.StatusCode.NOT_FOUND,
            f"simulation {sim_id} is not handed out to an external client of study {self.study_id} "
            "(ask Study.NextSimulation for one; a finished or failed simulation cannot be sent again)",
        )

    def settle(self, sim_id: int, outcome: str, produced: int = 0, expect: Lease | None = None) -> bool:
        """Once per hand-out: ``done``, ``failed`` (re-queued if tries are left) or ``cancelled``.

        With ``expect``, only that hand-out is settled (not a later one of the same, re-queued, id).
        Returns whether the simulation is handed out again."""
        with self._lock:
            if sim_id not in self._out or (expect is not None and self._out[sim_id] is not expect):
                return False
            del self._out[sim_id]
            self._counts[outcome] += 1
        again = self.ids.settle([sim_id], outcome, requeue=outcome == "failed")
        self.on_event(outcome, sim_id, produced)
        return bool(again)

    def close(self, reason: str) -> None:
        """No more hand-outs; leases no stream carries are cancelled (streams settle theirs as they end)."""
        with self._lock:
            if not self.open:
                return
            self.open = False
            self.closed_reason = reason
            left = [s.sim_id for s in self._out.values() if s.stream is None]
        for sim_id in left:
            self.settle(sim_id, "cancelled")

    def counts(self) -> tuple[int, int, dict[str, int]]:
        """``(streams carrying a lease, leases out, counts by outcome)``, read together."""
        with self._lock:
            return self._streams, len(self._out), dict(self._counts)
