"""Pipeline benchmark for a study (default: the embedded default), measured side by side in one run.

Prints:
  * solver-only samples/s: the bare batched solver in this process;
  * samples/s delivered to the trainer through the pipeline (solver actors -> buffer actor -> Ray Train);
  * the trainer's data-wait fraction while streaming;
  * training steps/s streamed vs the same loop on in-memory tensors (the ratio).

    python benchmarks/pipeline.py [--config configs/heat2d-mlp.yaml] [--steps 1500]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import solvers
from services.config import DEFAULT_CONFIG, load_config
from services.sampling import Sampler
from trainer.loop import Normaliser, evaluate, run_loop
from trainer.models import build_model


def solver_only(cfg, seconds: float) -> float:
    """Samples/s of the bare solver, batched as the solver actors batch it."""
    solver = solvers.get(cfg.problem.solver, **cfg.problem.config)
    spec = cfg.problem.spec()
    sampler = Sampler(spec.params, "uniform", 0)
    b = cfg.solvers.sims_per_call
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        params = sampler.draw(b)
        traj = solver.solve(params, np.zeros(b, dtype=np.int64))
        x, _y, _, _ = spec.samples_from_trajectories(params, np.arange(b), traj)
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def in_memory(cfg, steps: int, sims: int) -> tuple[float, float]:
    """Steps/s of the same loop on tensors already in memory (random batches of a fixed set)."""
    solver = solvers.get(cfg.problem.solver, **cfg.problem.config)
    spec = cfg.problem.spec()
    params = Sampler(spec.params, "uniform", 1).draw(sims)
    traj = solver.solve(params, np.zeros(sims, dtype=np.int64))
    x, y, _, _ = spec.samples_from_trajectories(params, np.arange(sims), traj)
    xt = torch.from_numpy(x).view(-1, *spec.in_shape)
    yt = torch.from_numpy(y).view(-1, *spec.out_shape)
    t = cfg.training
    model = build_model(t.model, spec.in_channels, len(spec.outputs), spec.grid, field_input=spec.field_input, **t.arch)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            i = torch.randint(0, xt.shape[0], (t.batch_size,), generator=g)
            yield xt[i], yt[i]

    norm = Normaliser.fit(y[:10_000], xt[:10_000].numpy() if spec.field_input else None)
    t0 = time.perf_counter()
    stats = run_loop(
        model,
        batches(),
        norm,
        steps=steps,
        lr=t.lr,
        warmup=t.warmup,
        validate_every=t.validate_every,
        validate=lambda: evaluate(model, xt[:2000], yt[:2000], norm),
    )
    wall = time.perf_counter() - t0
    return steps / (stats.compute_s + stats.data_wait_s), steps / wall


def streamed(cfg, steps: int) -> dict:
    import ray

    from services.study import Study

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    try:
        data = cfg.model_dump()
        data["training"]["steps"] = steps
        data["simulations"] = 10**7
        from services.config import parse_config

        study = Study(parse_config(data), tempfile.mkdtemp(prefix="surge-bench-")).start()
        peak_rate = 0.0
        while study.running:
            time.sleep(1.0)
            peak_rate = max(peak_rate, study.snapshot()["samples"]["produced_per_s"])
        snap = study.snapshot()
        study.release()
    finally:
        ray.shutdown()
    if snap["state"] != "finished":
        raise SystemExit(f"streamed study ended {snap['state']}: {snap['error']}")
    tr = snap["training"]
    busy = tr["compute_s"] + tr["data_wait_s"]
    return {
        "steps_per_s": tr["step"] / busy,
        "delivered_per_s": tr["samples_seen"] / busy,
        "wait_fraction": tr["data_wait_s"] / busy,
        "produced_peak_per_s": peak_rate,
        "validation_error": tr["validation_error"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--steps", type=int, default=1500, help="training steps for both the streamed and in-memory runs")
    ap.add_argument("--solver-seconds", type=float, default=10.0)
    ap.add_argument("--memory-sims", type=int, default=200, help="simulations held in memory for the baseline")
    args = ap.parse_args()
    cfg = load_config(args.config)
    # Ray gives a 1-CPU worker one torch thread; the in-memory baseline gets the same.
    torch.set_num_threads(1)

    print(
        f"study {cfg.name}: {cfg.problem.solver} {dict(cfg.problem.config)}, model {cfg.training.model}, "
        f"batch {cfg.training.batch_size}, {args.steps} steps, {os.cpu_count()} cores"
    )
    solver_rate = solver_only(cfg, args.solver_seconds)
    mem_busy, _ = in_memory(cfg, args.steps, args.memory_sims)
    s = streamed(cfg, args.steps)
    batch = cfg.training.batch_size
    rows = [
        ("solver only (bare, one process)", f"{solver_rate:,.0f} samples/s", ""),
        (
            "pipeline, produced (peak)",
            f"{s['produced_peak_per_s']:,.0f} samples/s",
            f"{s['produced_peak_per_s'] / solver_rate:.2f} x solver-only",
        ),
        (
            "pipeline, delivered to trainer",
            f"{s['delivered_per_s']:,.0f} samples/s",
            f"{s['delivered_per_s'] / solver_rate:.2f} x solver-only",
        ),
        ("trainer data-wait fraction", f"{s['wait_fraction']:.1%}", ""),
        ("steps/s in memory", f"{mem_busy:.1f}", f"({mem_busy * batch:,.0f} samples/s)"),
        ("steps/s streamed", f"{s['steps_per_s']:.1f}", f"{s['steps_per_s'] / mem_busy:.2f} x in-memory"),
    ]
    w = max(len(r[0]) for r in rows)
    for name, val, ratio in rows:
        print(f"  {name:<{w}}  {val:>20}  {ratio}")
    print(f"  streamed validation rel. L2 after {args.steps} steps: {s['validation_error']:.4f}")


if __name__ == "__main__":
    main()
