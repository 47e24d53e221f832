"""``surge dataset build``: run a study's solvers once and write their samples to a zarr store.

The same solver, parameter sampler and sample assembly as the online stream, so an offline
study on the store differs from an online one only in where the samples come from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import solvers
from services.config import StudyConfig
from services.sampling import Sampler, simulation_seeds
from trainer.dataset import DatasetWriter


def build_dataset(
    cfg: StudyConfig,
    simulations: int,
    out: str | Path,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Solve ``simulations`` simulations (sampler seed ``seed``, default the study's) into ``out``."""
    spec = cfg.problem.spec()
    seed = cfg.sampler.seed if seed is None else seed
    solver = solvers.get(spec.solver, **spec.solver_config)
    sampler = Sampler(spec.params, cfg.sampler.kind, seed)
    extra = {
        "solver_config": dict(spec.solver_config),
        "sampler": {"kind": cfg.sampler.kind, "seed": seed},
        "study": cfg.name,
        "created_at": time.time(),
    }
    writer = DatasetWriter(out, spec, simulations, extra=extra)
    b = cfg.solvers.sims_per_call
    for start in range(0, simulations, b):
        ids = np.arange(start, min(simulations, start + b), dtype=np.int64)
        params = sampler.draw(len(ids))
        asm = spec.assembler(params, ids)
        parts = [s for k, f in solver.stream(params, simulation_seeds(seed, ids)) if (s := asm.feed(k, f)) is not None]
        x, y, sid, tix = (np.concatenate(a) for a in zip(*parts, strict=True))
        # Chunks hold one simulation each: write in simulation order.
        order = np.lexsort((tix, sid))
        writer.write(x[order], y[order], sid[order], tix[order])
        if progress is not None:
            progress(int(ids[-1]) + 1, simulations)
    writer.close()
    return Path(out)
