"""Ensemble training: K members in one run (what ``training.ensemble: K`` does) against K runs in parallel.

The same K members (MLP surrogate of heat2d, as Melissa's), the same steps and batches, on one machine
in one run of this script:

- ``one_run``: one process trains ``trainer.ensemble.Ensemble`` of K members with all the cores,
  one optimiser step of every member per batch (``trainer.loop.train_step``, online bagging);
- ``parallel``: K processes started at once, each training one member with ``cores / K`` threads
  (what K separate Ray Train runs of one model would do on these cores, without Ray's own cost);
- ``single``: one member alone with all the cores, the cost of a plain model.

``one_run_over_parallel`` is the wall time of the first over the second (below 1: one run is faster).
A stream feeds both alike here (batches come from memory): one run also reads the stream once where K
runs read it K times, which this figure does not even count.

    python benchmarks/ensemble.py [--quick] [--members 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import solvers  # noqa: E402
from trainer.ensemble import build_ensemble  # noqa: E402
from trainer.loop import Normaliser, train_step  # noqa: E402
from trainer.problem import ProblemSpec  # noqa: E402

SOLVER = {"n": 32, "steps": 20, "dt": 0.005}
ARCH = {"hidden": 256, "layers": 3}
BATCH = 64


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _train(k: int, steps: int, threads: int, seed: int) -> float:
    """Seconds for ``steps`` steps of ``k`` members (``k == 1``: a plain model) at ``threads`` threads."""
    torch.set_num_threads(threads)
    spec = ProblemSpec.from_solver(solvers.get("heat2d", **SOLVER), SOLVER)
    torch.manual_seed(seed)
    net = build_ensemble(k, "mlp", spec.in_channels, 1, spec.grid, **ARCH)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(BATCH * 8, spec.in_channels, generator=g)
    y = 300 + 100 * torch.rand(BATCH * 8, 1, *spec.grid, generator=g)
    norm = Normaliser(300.0, 100.0)
    train_step(net, opt, x[:BATCH], y[:BATCH], norm, 1e-3)  # warm-up: allocations, kernels
    t0 = time.perf_counter()
    for i in range(steps):
        j = (i % 8) * BATCH
        train_step(net, opt, x[j : j + BATCH], y[j : j + BATCH], norm, 1e-3)
    return time.perf_counter() - t0


def _member(steps: int, threads: int, seed: int, ready: mp.Barrier, out: mp.Queue) -> None:
    """One member's run in its own process; every process starts its timed steps at the barrier."""
    torch.set_num_threads(threads)
    _train(1, 1, threads, seed)  # imports and first allocations before the barrier
    ready.wait()
    t0 = time.perf_counter()
    _train(1, steps, threads, seed)
    out.put(time.perf_counter() - t0)


def _parallel(k: int, steps: int, threads: int) -> float:
    """Wall seconds from the barrier until the last of ``k`` member processes has ended."""
    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(k + 1), ctx.Queue()
    procs = [ctx.Process(target=_member, args=(steps, threads, i, ready, out)) for i in range(k)]
    for p in procs:
        p.start()
    ready.wait()
    t0 = time.perf_counter()
    times = [out.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return max(wall, *times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print a JSON object as the last line")
    args = ap.parse_args()
    k, cores = args.members, _cores()
    steps = args.steps or (30 if args.quick else 200)
    threads = max(1, cores // k)
    one = _train(k, steps, cores, 0)
    parallel = _parallel(k, steps, threads)
    single = _train(1, steps, cores, 0)
    out = {
        "members": k,
        "cores": cores,
        "steps": steps,
        "one_run_s": round(one, 3),
        "parallel_s": round(parallel, 3),
        "single_s": round(single, 3),
        "one_run_over_parallel": round(one / parallel, 3),
        "one_run_over_single": round(one / single, 3),
    }
    print(f"{k} members, {steps} steps of batch {BATCH}, {cores} cores")
    print(f"  one run (Ensemble, {cores} threads):         {one:8.2f} s")
    print(f"  {k} runs in parallel ({threads} thread(s) each): {parallel:8.2f} s")
    print(f"  one member alone ({cores} threads):           {single:8.2f} s")
    print(
        f"  one run / parallel: {out['one_run_over_parallel']:.2f}   one run / single: {out['one_run_over_single']:.2f}"
    )
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
