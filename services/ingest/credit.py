"""The credit window of one Ingest.Stream: how many bytes a client may send before it waits for an Ack.

The server grants ``window`` bytes when it admits a simulation and gives back what arrived once half a
window has (one Ack per half window, not per chunk). A chunk over the credit left is refused: a client
that ignores the window cannot make the server buffer more than that."""

from __future__ import annotations

import grpc
import numpy as np

from services.ingest.errors import Reject
from trainer.problem import ProblemSpec

MIN_WINDOW = 32 * 2**20  # credit granted per stream at a time, at least (and at least one float64 field)


def window_bytes(spec: ProblemSpec) -> int:
    """The credit of one stream: 32 MiB, or two float64 fields of the grid if that is more."""
    return max(MIN_WINDOW, 2 * int(np.prod(spec.grid)) * 8)


class Credit:
    """The bytes one stream may still send (``left``), and those received but not yet given back."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.left = window
        self._unacked = 0

    def take(self, n: int, sim_id: int) -> None:
        """A chunk of ``n`` bytes arrived: spend its credit, or ``Reject`` if the client sent more than it had."""
        if n > self.left:
            raise Reject(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"simulation {sim_id}: a chunk of {n} bytes exceeds the credit left ({self.left} bytes); "
                "wait for an Ack",
            )
        self.left -= n

    def received(self, n: int) -> int:
        """``n`` bytes were staged; returns the credit to grant now in an Ack (0: none yet)."""
        self._unacked += n
        if self._unacked < self.window // 2:
            return 0
        grant, self._unacked = self._unacked, 0
        self.left += grant
        return grant
