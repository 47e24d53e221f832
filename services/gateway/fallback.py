"""``predict?fallback=solve&max_std=X``: where the ensemble is unsure, the answer comes from the solver.

The gateway predicts first; when the ensemble's standard deviation exceeds ``max_std`` anywhere in the
answer, it asks the study that trains the model (``StudyManager.solve``, the studies run in this
process) to solve the point at once, and answers with the solver's fields at the requested times,
``"source": "solver"``. That simulation joins the study's training stream (``services.fallback``).
At most ``max_fallbacks`` solves wait at once per gateway; each waits ``fallback_timeout_s`` at most.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from services import metrics as M
from services.fallback import FallbackBusy, FallbackError, FallbackUnavailable, at_times
from services.gateway import predict as P
from services.gateway.settings import GatewaySettings
from trainer.store import LoadedModel

NEEDS_ENSEMBLE = (
    "fallback=solve compares the ensemble's std with max_std, and {name!r} is a single model: train it with "
    "training.ensemble >= 2"
)
NEEDS_PARAMETRIC = "fallback=solve answers parameter points, and {name!r} takes input fields"
NO_SOLVER = (
    "fallback=solve needs the study of {name!r} running in this gateway's process (surge run, or POST /v1/studies "
    "to a gateway that runs studies itself); this gateway has none that can solve"
)
BUSY = "{n} fallback solves are waiting already (limit SURGE_MAX_FALLBACKS = {limit}): retry later"


@dataclass(frozen=True)
class Unsure:
    """A prediction whose std exceeded ``max_std``: what the solver must answer instead."""

    model: LoadedModel
    inp: P.PredictInput
    max_std: float


def check_query(fallback: str | None, max_std: float | None) -> float | None:
    """The ``max_std`` to compare with, or None without a fallback; ``PredictError(422)`` for a half pair."""
    if fallback is None:
        if max_std is not None:
            raise P.PredictError(422, "max_std is the threshold of fallback=solve: add fallback=solve, or drop it")
        return None
    if max_std is None:
        raise P.PredictError(422, "fallback=solve needs max_std: the standard deviation above which the solver answers")
    return max_std


def unsure(m: LoadedModel, inp: P.PredictInput, std: np.ndarray | None, max_std: float) -> bool:
    """Whether this answer goes to the solver; ``PredictError(422)`` for a model that cannot say (counted as
    outcome ``refused``: fallbacks asked of models that cannot give them are worth seeing on a dashboard)."""
    if std is None:
        raise _refused(m, NEEDS_ENSEMBLE.format(name=m.name))
    if m.spec.field_input:
        raise _refused(m, NEEDS_PARAMETRIC.format(name=m.name))
    if not np.all(inp.rows[:, :-1] == inp.rows[:1, :-1]):
        raise _refused(m, "fallback=solve answers one parameter point per request: every row's parameters must match")
    return bool(np.max(std) > max_std)


def _refused(m: LoadedModel, message: str) -> P.PredictError:
    M.PREDICT_FALLBACKS.labels(m.name, "refused").inc()
    return P.PredictError(422, message)


class FallbackGate:
    """The gateway's cap on waiting fallback solves (changed on the event loop only: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.waiting = 0

    async def solve(self, manager: Any, u: Unsure, settings: GatewaySettings) -> tuple[int, np.ndarray]:
        """``(sim_id, fields [N, C_out, *grid])`` at the request's times; raises ``FallbackError``."""
        name = u.model.name
        outcome = "failed"
        try:
            solve = getattr(manager, "solve", None)
            if solve is None or self.limit == 0:
                outcome = "unavailable"
                raise FallbackUnavailable(NO_SOLVER.format(name=name))
            if self.waiting >= self.limit:
                outcome = "busy"
                raise FallbackBusy(BUSY.format(n=self.waiting, limit=self.limit))
            self.waiting += 1
            try:
                params, times = u.inp.rows[0, :-1], u.inp.rows[:, -1]  # one parameter point, its times
                spec = u.model.spec
                sim_id, fields = await asyncio.to_thread(
                    solve, name, tuple(spec.params.names), params, settings.fallback_timeout_s
                )
            finally:
                self.waiting -= 1
            outcome = "solved"
            return sim_id, at_times(spec, fields, times)
        except FallbackError as e:
            if isinstance(e, FallbackBusy):
                outcome = "busy"
            elif outcome == "failed":
                outcome = {503: "unavailable", 504: "timeout"}.get(e.status, "failed")
            raise
        finally:
            M.PREDICT_FALLBACKS.labels(name, outcome).inc()


__all__ = ["BUSY", "NEEDS_ENSEMBLE", "NEEDS_PARAMETRIC", "NO_SOLVER", "FallbackGate", "Unsure", "check_query", "unsure"]
