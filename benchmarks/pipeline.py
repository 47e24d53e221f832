"""Pipeline benchmark for a study (default: the embedded default), measured side by side in one run.

What is compared, all with the study's model, batch and one torch thread per trainer:

  * ``in_memory``: the training loop on tensors already in memory (random batches of a fixed set);
  * ``full_buffer``: the same loop in this process drawing its batches through the data plane from a
    buffer shard that is already full, the producers idle (``ShardBatches``: references from the shard,
    zero-copy views, one copy into the batch, prefetched in a thread). ``full_buffer_ratio`` is its
    steps/s over ``in_memory``'s, and ``data_wait_full`` the fraction of the loop spent waiting for data;
  * ``streamed``: the whole study on Ray (solver actors -> shard -> Ray Train worker) with the producers
    running; ``streamed_ratio`` and ``data_wait`` as above. On a 2-core machine the producers take CPU
    from the trainer: the solver CPU time per trainer second is reported;
  * ``scaling_trainers``: samples/s consumed with 2 Ray Train workers / 1, trainer-bound (reservoir shards
    filled before training starts, so no rank ever waits on a solver);
  * ``scaling_solvers``: samples/s produced with 2 solver actors / 1, solver-bound (reservoir shard: a
    put never waits on the trainer).

Absolute times on shared machines are noisy; the ratios are measured in the same run.

    python benchmarks/pipeline.py [--config configs/heat2d-mlp.yaml] [--steps 1500] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import solvers
from services.config import DEFAULT_CONFIG, StudyConfig, load_config, parse_config
from services.sampling import Sampler
from trainer.loop import LoopHooks, Normaliser, Schedule, evaluate, run_loop
from trainer.models import build_model


def _samples(cfg: StudyConfig, sims: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    solver = solvers.get(cfg.problem.solver, **cfg.problem.config)
    spec = cfg.problem.spec()
    params = Sampler(spec.params, "uniform", seed).draw(sims)
    traj = solver.solve(params, np.zeros(sims, dtype=np.int64))
    return spec.samples_from_trajectories(params, np.arange(sims), traj)


def _loop(cfg: StudyConfig, batches, steps: int, x_val: torch.Tensor, y_val: torch.Tensor, norm: Normaliser):
    spec = cfg.problem.spec()
    t = cfg.training
    torch.manual_seed(0)
    model = build_model(t.model, spec.in_channels, len(spec.outputs), spec.grid, field_input=spec.field_input, **t.arch)
    hooks = LoopHooks(validate=lambda: evaluate(model, x_val, y_val, norm))
    sched = Schedule(t.lr, steps, t.warmup, t.schedule, t.decay_every, t.decay_gamma)
    t0 = time.perf_counter()
    stats = run_loop(model, batches, norm, sched, hooks, validate_every=t.validate_every)
    return stats, time.perf_counter() - t0


def in_memory_and_full_buffer(cfg: StudyConfig, steps: int, sims: int, rounds: int = 3) -> dict[str, float]:
    """The loop on in-memory tensors, then on a full shard with no producer, in this process."""
    import ray

    from services.actors import BufferShard
    from services.dataplane import ShardBatches, ShardRouter

    spec = cfg.problem.spec()
    x, y, sid, tix = _samples(cfg, sims)
    xt = torch.from_numpy(x).view(-1, *spec.in_shape)
    yt = torch.from_numpy(y).view(-1, *spec.out_shape)
    norm = Normaliser.fit(y[:10_000], xt[:10_000].numpy() if spec.field_input else None)
    x_val, y_val = xt[:512], yt[:512]
    g = torch.Generator().manual_seed(0)
    b = cfg.training.batch_size

    def memory():
        while True:
            i = torch.randint(0, xt.shape[0], (b,), generator=g)
            yield xt[i], yt[i]

    # A reservoir holding every sample: it never runs dry, and nothing produces while the loop runs.
    shard = BufferShard.options(num_cpus=0).remote("reservoir", x.shape[0], x.shape[0])
    router = ShardRouter([shard])
    per = cfg.solvers.sims_per_call * len(spec.times)
    for a in range(0, x.shape[0], per):
        router.put(x[a : a + per], y[a : a + per], sid[a : a + per], tix[a : a + per])
    # Alternating rounds, the median of the paired ratios: a shared 2-core machine drifts by tens of
    # percent within a minute, which one run of each would mistake for the data plane's cost.
    ratios, waits, mem_waits, walls, mem_rates, full_rates = [], [], [], [], [], []
    for _ in range(rounds):
        mem, mem_wall = _loop(cfg, memory(), steps, x_val, y_val, norm)
        feed = ShardBatches(shard, b, torch.device("cpu"), spec.in_shape, spec.out_shape)
        full, full_wall = _loop(cfg, iter(feed), steps, x_val, y_val, norm)
        feed.close()
        mem_rates.append(steps / (mem.compute_s + mem.data_wait_s))
        full_rates.append(steps / (full.compute_s + full.data_wait_s))
        ratios.append(full_rates[-1] / mem_rates[-1])
        waits.append(full.data_wait_s / (full.compute_s + full.data_wait_s))
        mem_waits.append(mem.data_wait_s / (mem.compute_s + mem.data_wait_s))  # the gather of the batch
        walls.append(mem_wall / full_wall)
    ray.kill(shard)
    return {
        "steps_per_s_in_memory": float(np.median(mem_rates)),
        "steps_per_s_full_buffer": float(np.median(full_rates)),
        "full_buffer_ratio": float(np.median(ratios)),
        "data_wait_full": float(np.median(waits)),
        "data_wait_in_memory": float(np.median(mem_waits)),
        "full_buffer_wall_ratio": float(np.median(walls)),
        "full_buffer_rounds": rounds,
    }


def _study(data: dict, timeout: float = 900):
    from services.study import Study

    study = Study(parse_config(data), tempfile.mkdtemp(prefix="surge-bench-")).start()
    if not study.join(timeout):
        study.stop()
        study.join(60)
    snap = study.snapshot()
    study.release()
    if snap["state"] != "finished":
        raise SystemExit(f"study ended {snap['state']}: {snap['error']}")
    return snap


def _solver_cpu_s() -> float:
    """CPU seconds used so far by the solver actor processes of this machine (Ray names them ``ray::SolverActor``)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("SolverActor" in part for part in proc.info["cmdline"] or ()):
                t = proc.cpu_times()
                total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def streamed(cfg: StudyConfig, steps: int) -> dict[str, float]:
    data = cfg.model_dump()
    data["training"].update(steps=steps, threads=1)
    data["simulations"] = 10**7
    cpu, done = [0.0], threading.Event()

    def watch() -> None:  # the solvers' CPU time, read until their processes go away
        while not done.wait(0.5):
            cpu[0] = max(cpu[0], _solver_cpu_s())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    snap = _study(data)
    wall = time.perf_counter() - t0
    done.set()
    watcher.join(5)
    tr = snap["training"]
    busy = tr["compute_s"] + tr["data_wait_s"]
    return {
        "steps_per_s_streamed": tr["step"] / busy,
        "data_wait": tr["data_wait_s"] / busy,
        "streamed_validation_error": tr["validation_error"],
        # Of the machine's cores, how many the solvers kept busy while the study ran.
        "solver_cores_streamed": cpu[0] / wall,
    }


def trainers(cfg: StudyConfig, steps: int, workers: int) -> float:
    """Samples/s consumed by ``workers`` ranks from reservoir shards filled before training starts."""
    spec = cfg.problem.spec()
    per_sim = spec.samples_per_simulation
    capacity = max(cfg.training.batch_size * 8 * workers, 40 * per_sim * workers)
    data = cfg.model_dump()
    data["training"].update(steps=steps, workers=workers, threads=1, validate_every=steps)
    data["buffer"] = {"policy": "reservoir", "capacity": capacity, "watermark": capacity}
    data["simulations"] = -(-capacity // per_sim)  # just enough to fill the shards: then the solvers are done
    data["solvers"] = {**data["solvers"], "actors": 1}
    tr = _study(data)["training"]
    return tr["samples_seen"] / (tr["compute_s"] + tr["data_wait_s"])


def producers(cfg: StudyConfig, actors: int, seconds: float) -> float:
    """Samples/s produced by ``actors`` solver actors into a reservoir shard (a put never waits)."""
    import ray

    from services.actors import BufferShard, SolverActor
    from services.dataplane import forward_chunks
    from services.sampling import simulation_seeds

    spec = cfg.problem.spec()
    shard = BufferShard.options(num_cpus=0).remote("reservoir", 20_000, 0)
    pool = [
        SolverActor.options(num_cpus=1).remote(spec.to_dict(), cfg.solvers.chunk_steps, 1, cfg.solvers.sims_per_call)
        for _ in range(actors)
    ]
    ray.get([a.pid.remote() for a in pool])
    sampler = Sampler(spec.params, "uniform", 0)
    lock, counter = threading.Lock(), [0]
    produced, stop = [0], threading.Event()

    def drive(actor) -> None:
        b = cfg.solvers.sims_per_call
        while not stop.is_set():
            with lock:
                first = counter[0]
                counter[0] += b
            ids = np.arange(first, first + b, dtype=np.int64)
            gen = actor.run.options(num_returns="streaming", _generator_backpressure_num_objects=4).remote(
                ids, sampler.draw(b), simulation_seeds(0, ids)
            )
            for n in forward_chunks(gen, [shard]):
                with lock:
                    produced[0] += n

    threads = [threading.Thread(target=drive, args=(a,), daemon=True) for a in pool for _ in range(2)]
    for th in threads:
        th.start()
    time.sleep(min(3.0, seconds / 3))  # past the actors' start-up
    with lock:
        n0, t0 = produced[0], time.perf_counter()
    time.sleep(seconds)
    with lock:
        n1, t1 = produced[0], time.perf_counter()
    stop.set()
    for th in threads:
        th.join(60)
    for a in [*pool, shard]:
        ray.kill(a)
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--steps", type=int, default=1500, help="training steps of each run")
    ap.add_argument("--memory-sims", type=int, default=200, help="simulations held in memory for the baselines")
    ap.add_argument("--solver-seconds", type=float, default=15.0, help="measuring window of the solver scaling")
    ap.add_argument("--quick", action="store_true", help="short runs (within 2 minutes on 2 cores)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object, last line")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.memory_sims, args.solver_seconds = 400, 60, 6.0
    cfg = load_config(args.config)
    # Ray gives a 1-CPU worker one torch thread; the in-process loops get the same.
    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(
        f"study {cfg.name}: {cfg.problem.solver} {dict(cfg.problem.config)}, model {cfg.training.model}, "
        f"batch {cfg.training.batch_size}, {args.steps} steps, {os.cpu_count()} cores"
    )
    try:
        out = in_memory_and_full_buffer(cfg, args.steps, args.memory_sims)
        out.update(streamed(cfg, args.steps))
        out["streamed_ratio"] = out["steps_per_s_streamed"] / out["steps_per_s_in_memory"]
        one, two = trainers(cfg, args.steps, 1), trainers(cfg, args.steps, 2)
        out.update(consumed_per_s_1_trainer=one, consumed_per_s_2_trainers=two, scaling_trainers=two / one)
        p1, p2 = producers(cfg, 1, args.solver_seconds), producers(cfg, 2, args.solver_seconds)
        out.update(produced_per_s_1_solver=p1, produced_per_s_2_solvers=p2, scaling_solvers=p2 / p1)
    finally:
        ray.shutdown()
    out["cpus"] = os.cpu_count()
    rows = [
        (
            "steps/s in memory",
            f"{out['steps_per_s_in_memory']:.1f}",
            f"data-wait {out['data_wait_in_memory']:.1%} (the batch gather)",
        ),
        (
            "steps/s from a full buffer",
            f"{out['steps_per_s_full_buffer']:.1f}",
            f"{out['full_buffer_ratio']:.2f} x in-memory, data-wait {out['data_wait_full']:.1%}",
        ),
        (
            "steps/s streamed (producers running)",
            f"{out['steps_per_s_streamed']:.1f}",
            f"{out['streamed_ratio']:.2f} x in-memory, data-wait {out['data_wait']:.1%}",
        ),
        (
            "samples/s consumed, 1 -> 2 trainers",
            f"{one:,.0f} -> {two:,.0f}",
            f"{out['scaling_trainers']:.2f} x",
        ),
        ("samples/s produced, 1 -> 2 solvers", f"{p1:,.0f} -> {p2:,.0f}", f"{out['scaling_solvers']:.2f} x"),
    ]
    w = max(len(r[0]) for r in rows)
    for name, val, ratio in rows:
        print(f"  {name:<{w}}  {val:>20}  {ratio}")
    print(f"  solvers used {out['solver_cores_streamed']:.2f} of {os.cpu_count()} cores while the study streamed")
    print(f"  streamed validation rel. L2 after {args.steps} steps: {out['streamed_validation_error']:.4f}")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
