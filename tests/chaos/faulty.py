"""Solvers a study may name by import path (``tests.chaos.faulty:...``) to fail in chosen ways."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import ClassVar

import numpy as np

from solvers.heat2d import Heat2D

ABORT_ABOVE = 450.0  # the first temperature parameter beyond which AbortingHeat2D kills its process
NAN_ABOVE = 450.0  # ... beyond which DivergingHeat2D's fields turn NaN


class AbortingHeat2D(Heat2D):
    """heat2d that calls ``os.abort()`` (SIGABRT, as a segfaulting native solver would die) for a region
    of its parameter box: every simulation there kills the process, on every attempt."""

    name: ClassVar[str] = "aborting-heat2d"

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        for k, fields in super().stream(params, seeds):
            if k == 2 and (np.asarray(params)[:, 0] > ABORT_ABOVE).any():
                os.abort()  # after some chunks went out: the re-run must drop what it sends again
            yield k, fields


class DivergingHeat2D(Heat2D):
    """heat2d whose fields turn NaN from the third recorded step on, for a region of its box."""

    name: ClassVar[str] = "diverging-heat2d"

    def stream(self, params: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        bad = np.asarray(params)[:, 0] > NAN_ABOVE
        for k, fields in super().stream(params, seeds):
            if k >= 3 and bad.any():
                fields = fields.copy()
                fields[bad] = np.nan
            yield k, fields
