"""The Ray Train worker: pulls batches from the buffer actor and runs ``trainer.loop``.

Rank 0 validates, publishes checkpoints to the model store and reports progress;
every rank trains on its own batches (DDP averages the gradients).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from trainer.dataset import Dataset
from trainer.loop import LoopStats, Normaliser, evaluate, make_card, run_loop
from trainer.models import build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore


def buffer_batches(
    buffer: ray.actor.ActorHandle,
    batch_size: int,
    device: torch.device,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    prefetch: int = 2,
    stop: Any = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
    """Batches from the buffer actor, keeping ``prefetch`` requests in flight while the step runs."""
    pending = deque(buffer.get.remote(batch_size) for _ in range(prefetch))
    while True:
        out = ray.get(pending.popleft())
        pending.append(buffer.get.remote(batch_size))
        if out is None:
            yield None
            return
        if out == ():  # nothing yet (watermark not reached): ask again
            if stop is not None and stop():
                yield None
                return
            continue
        x, y = out
        b = x.shape[0]
        yield (
            torch.from_numpy(x).view(b, *in_shape).to(device, non_blocking=True),  # (B, F) or (B, F, *grid)
            torch.from_numpy(y).view(b, *out_shape).to(device, non_blocking=True),  # (B, C, *grid)
        )


def _agreed(batches: Iterator[Any], world_size: int, device: torch.device) -> Iterator[Any]:
    """With several workers, stop all of them as soon as one sees the end (else DDP would hang)."""
    for b in batches:
        if world_size > 1:
            flag = torch.tensor([0 if b is None else 1], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            if int(flag.item()) == 0:
                yield None
                return
        yield b
        if b is None:
            return


_NODES: set[str] = set()


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the study's ``TorchTrainer``."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Every rank's node, gathered on rank 0 (the study reports where its work ran).
    node = ray.get_runtime_context().get_node_id()
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, node)
        _NODES.update(gathered)
    else:
        _NODES.add(node)
    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    spec = ProblemSpec.from_dict(config["problem"])
    buffer = config["buffer"]
    device = ray.train.torch.get_device()
    arch = dict(config["arch"])
    in_ch, out_ch = spec.in_channels, len(spec.outputs)
    torch.manual_seed(int(config.get("seed", 0)))
    net = build_model(config["model"], in_ch, out_ch, spec.grid, field_input=spec.field_input, **arch)
    model = ray.train.torch.prepare_model(net)

    x_val_np, y_val_np = ray.get(config["validation"])
    n_val = x_val_np.shape[0]
    # np.array: object-store arrays are read-only
    x_val = torch.from_numpy(np.array(x_val_np)).view(n_val, *spec.in_shape).to(device)
    y_val = torch.from_numpy(np.array(y_val_np)).view(n_val, *spec.out_shape).to(device)

    if config.get("dataset"):
        # Offline: cycle over a zarr dataset (epochs), everything else as online.
        ds = Dataset(config["dataset"])
        ds.check_compatible(spec)
        source: Iterator[Any] = ds.epochs(config["batch_size"], seed=int(config.get("seed", 0)) + rank, device=device)
    else:
        source = buffer_batches(buffer, config["batch_size"], device, spec.in_shape, spec.out_shape)
    batches = _agreed(source, world, device)
    t_start = time.perf_counter()
    first = next(batches, None)  # blocks until the buffer reaches its watermark
    startup_wait = time.perf_counter() - t_start
    if first is None:
        return
    # Scalings from running statistics of the stream's first `norm_steps` batches, then fixed (saved in the card).
    norm = Normaliser()

    def stream() -> Iterator[Any]:
        yield first
        yield from batches

    store = ModelStore(config["store"])
    name = config["model_name"]
    last_report = [0.0]

    def progress(s: LoopStats) -> None:
        now = time.perf_counter()
        if rank == 0 and now - last_report[0] > 0.5:
            last_report[0] = now
            buffer.report_training.remote(_stats_dict(s, startup_wait, world))

    def on_validate(s: LoopStats) -> None:
        metrics = _stats_dict(s, startup_wait, world)
        if rank == 0:
            card = make_card(
                problem=spec.to_dict(),
                model_name=config["model"],
                arch=arch,
                in_channels=in_ch,
                out_channels=out_ch,
                grid=spec.grid,
                norm=norm,
                stats=s,
                study_id=config["study_id"],
                field_input=spec.field_input,
            )
            # Every worker has seen its own batches; the card counts them all.
            card["samples_seen"] = s.samples_seen * world
            version = store.publish(name, net, card)
            store.prune(name, int(config.get("keep_versions", 5)))
            metrics["version"] = version
            ray.get(buffer.report_training.remote(metrics))
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, int | float)})

    run_loop(
        model,
        stream(),
        norm,
        steps=int(config["steps"]),
        lr=float(config["lr"]),
        warmup=int(config.get("warmup", 0)),
        validate_every=int(config["validate_every"]),
        validate=lambda: evaluate(model, x_val, y_val, norm),
        on_progress=progress,
        on_validate=on_validate,
        norm_steps=int(config.get("norm_steps", 100)),
        field_input=spec.field_input,
        loss=config.get("loss", "rel_l2"),
        schedule=config.get("schedule", "cosine"),
        decay_every=int(config.get("decay_every", 0)),
        decay_gamma=float(config.get("decay_gamma", 0.5)),
    )
    if rank == 0:
        ray.get(buffer.report_training.remote({"finished": True}))


def _stats_dict(s: LoopStats, startup_wait: float, world: int) -> dict[str, Any]:
    return {
        "step": s.step,
        "samples_seen": s.samples_seen * world,
        "loss": s.loss,
        "validation_error": s.validation_error,
        "data_wait_s": s.data_wait_s,
        "compute_s": s.compute_s,
        "startup_wait_s": startup_wait,
        "history": list(s.history),
        "time": time.time(),
        "nodes": sorted(_NODES),
    }


def validation_set(spec: ProblemSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out simulations solved once with fixed seeds: flat samples ``(x, y)`` as the buffer holds them."""
    import solvers
    from services.sampling import Sampler, simulation_seeds

    solver = solvers.get(spec.solver, **spec.solver_config)
    params = Sampler(spec.params, "uniform", seed).draw(n)
    ids = -1 - np.arange(n, dtype=np.int64)  # negative ids never collide with the stream's
    traj = solver.solve(params, simulation_seeds(seed, ids))
    x, y, _, _ = spec.samples_from_trajectories(params, ids, traj)
    return x, y
