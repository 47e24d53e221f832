"""Solver throughput: every registered solver at its default resolution, batched vs one by one.

For each solver (its ``BENCH`` config: the default resolution, fewer steps so a call is short)
prints simulations/s, grid-point updates/s and the ratio of one batched call over B
simulations to solving the same B simulations one at a time, measured side by side.

    python benchmarks/solvers.py [--batch 8] [--repeat 3] [--only heat2d,burgers1d] [--torch]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import solvers


def _best(fn, repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def updates_per_sim(solver) -> float:
    """Grid-point updates of one simulation: solve-grid points times internal steps (as the solver reports)."""
    work = getattr(solver, "work_per_simulation", None)
    if callable(work):
        return float(work())
    return float(math.prod(solver.grid) * max(1, len(solver.times) - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated solver names")
    ap.add_argument("--torch", action="store_true", help="also time solve_torch (CUDA when present)")
    args = ap.parse_args()
    names = [n for n in solvers.available() if not args.only or n in args.only.split(",")]
    b = args.batch
    head = f"{'solver':<22}{'config':<44}{'sims/s':>10}{'updates/s':>12}{'batched/1-by-1':>16}"
    if args.torch:
        head += f"{'torch/numpy':>13}"
    print(f"batch {b}, best of {args.repeat}")
    print(head)
    for name in names:
        print(bench_one(name, b, args.repeat, args.torch), flush=True)


def bench_one(name: str, b: int, repeat: int, with_torch: bool) -> str:
    bench = dict(getattr(solvers.solver_class(name), "BENCH", {}))
    solver = solvers.get(name, **bench)
    space = solver.params
    params = space.scale(np.random.default_rng(0).random((b, space.dim)))
    seeds = np.arange(b, dtype=np.int64)
    solver.solve(params[:1], seeds[:1])  # warm-up (plans, factorisations, caches)
    t_batch = _best(lambda: solver.solve(params, seeds), repeat)
    t_single = _best(lambda: [solver.solve(params[i : i + 1], seeds[i : i + 1]) for i in range(b)], repeat)
    line = (
        f"{name:<22}{str(bench)[:42]:<44}{b / t_batch:>10.1f}{b * updates_per_sim(solver) / t_batch:>12.3g}"
        f"{t_single / t_batch:>15.1f}x"
    )
    if with_torch and hasattr(solver, "solve_torch"):
        solver.solve_torch(params[:1], seeds[:1])
        t_torch = _best(lambda: solver.solve_torch(params, seeds), repeat)
        line += f"{t_batch / t_torch:>12.1f}x"
    return line


if __name__ == "__main__":
    main()
