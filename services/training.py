"""The Ray Train worker: draws batches from its rank's buffer shard and runs ``trainer.loop``.

Every rank trains on its own shard's batches (DDP averages the gradients); the normalisation
statistics of the first steps are merged over every rank's batch, so all ranks scale alike; the
validation set is split over the ranks and their errors summed; rank 0 publishes checkpoints to
the model store and reports progress.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from services.config import TrainingConfig
from services.dataplane import ShardBatches
from services.metrics import PROGRESS_DIR
from trainer.checkpoint import latest_state_dir, load_training_state, save_state_dir, state_step
from trainer.dataset import Dataset
from trainer.ensemble import Calibration, build_ensemble, calibrate, ensemble_spread, members_of, ratio_histogram
from trainer.loop import (
    LoopHooks,
    LoopStats,
    Moments,
    Normaliser,
    Schedule,
    SimulationLosses,
    evaluate,
    make_card,
    rel_l2_per_sample,
    run_loop,
)
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

log = logging.getLogger("surge.training")

SHARD_WAIT_S = 300.0
LOSS_REPORT_S = 2.0  # how often a rank sends its per-simulation losses to an adaptive sampler


@dataclass(frozen=True)
class WorkerInputs:
    """What a Ray Train worker needs besides the validated ``TrainingConfig``."""

    problem: dict[str, Any]
    control: Any  # services.actors.StudyControl
    validation: Any  # ObjectRef of (x_val, y_val)
    store: str
    model_name: str
    study_id: str
    seed: int
    dataset: str | None = None
    validation_set: str | None = None  # fingerprint of the validation arrays (see validation_fingerprint)
    record_keys: bool = False  # ranks report the (sim_id, t_index) keys they trained on (tests)
    sample_losses: bool = False  # ranks report per-simulation training losses (an adaptive sampler)
    sampler: dict[str, Any] | None = None  # recorded in the card: how the simulations were chosen


def schedule_of(t: TrainingConfig) -> Schedule:
    """The learning-rate schedule a training config describes."""
    return Schedule(t.lr, t.steps, t.warmup, t.schedule, t.decay_every, t.decay_gamma)


def _agreed(batches: Iterator[Any], world_size: int, device: torch.device) -> Iterator[Any]:
    """With several workers, stop all of them as soon as one sees the end (else DDP would hang), and count
    the step's samples over every rank: one all-reduce of ``[ended, rows]`` per step."""
    for b in batches:
        rows = 0 if b is None else int(b[0].shape[0])
        if world_size > 1:
            flag = torch.tensor([1 if b is None else 0, rows], dtype=torch.int64, device=device)
            torch.distributed.all_reduce(flag)
            if int(flag[0]) > 0:
                yield None
                return
            rows = int(flag[1])
        if b is None:
            yield None
            return
        yield (b[0], b[1], rows, *b[2:])  # and the rows' simulation ids, when the feed gives them


def _reduce_moments(m: Moments, world: int) -> Moments:
    """The moments of every rank's batch, merged in rank order (so the result is bit-identical on all ranks)."""
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, m)
    out = gathered[0]
    for g in gathered[1:]:
        out = out.merge(g)
    return out


def _validate(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normaliser, world: int) -> float:
    """Each rank evaluates its slice of the validation set once; the per-sample errors are summed over ranks."""
    n_local = x.shape[0]
    err = evaluate(net, x, y, norm) * n_local if n_local else 0.0
    if world == 1:
        return err / max(1, n_local)
    tot = torch.tensor([err, float(n_local)], dtype=torch.float64, device=x.device)
    torch.distributed.all_reduce(tot)
    return float(tot[0] / tot[1].clamp_min(1))


def _validate_ensemble(
    net: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Normaliser,
    world: int,
    first_half: torch.Tensor,
) -> tuple[float, Calibration]:
    """The validation error of the members' mean and the ensemble's calibration: ``std_scale`` fitted on the
    validation samples of the first half (``first_half [n_local]`` bool: the first half of the simulations),
    coverage measured on the second. Ranks sum their errors and their ratio histograms."""
    n_local = x.shape[0]
    members = members_of(net)
    err_sum = 0.0
    if n_local:
        mean, spread = ensemble_spread(net, x, norm)  # (n, C, *grid) each
        target = y.view_as(mean)
        err_sum = float(rel_l2_per_sample(mean, target).sum())
        diff = mean - target
        fit, check = (
            ratio_histogram(diff[first_half], spread[first_half]),
            ratio_histogram(diff[~first_half], spread[~first_half]),
        )
    else:
        fit = check = ratio_histogram(torch.zeros(0), torch.zeros(0))
    if world == 1:
        return err_sum / max(1, n_local), calibrate(fit, check, members)
    tot = torch.cat([torch.tensor([err_sum, float(n_local)], dtype=torch.float64), fit, check]).to(x.device)
    torch.distributed.all_reduce(tot)
    tot = tot.cpu()
    bins = fit.numel()
    return float(tot[0] / tot[1].clamp_min(1)), calibrate(tot[2 : 2 + bins], tot[2 + bins :], members)


def weights_digest(net: torch.nn.Module) -> str:
    """A hash of the model's parameters (ranks in step hold identical weights)."""
    h = hashlib.sha256()
    for name, p in sorted(net.state_dict().items()):
        if not isinstance(p, torch.Tensor):  # extra state some layers keep (metadata, not weights)
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_worker(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the study's ``TorchTrainer``.

    ``config`` is ``{"training": TrainingConfig, "inputs": WorkerInputs}`` (Ray Train wants a dict)."""
    t: TrainingConfig = config["training"]
    inp: WorkerInputs = config["inputs"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    control = inp.control
    node = ray.get_runtime_context().get_node_id()
    ray.get(control.register_rank.remote(rank, node, os.getpid()))
    nodes = [node]
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, node)
        nodes = gathered
    if t.threads:
        torch.set_num_threads(int(t.threads))
    spec = ProblemSpec.from_dict(inp.problem)
    device = ray.train.torch.get_device()
    arch = dict(t.arch)
    in_ch, out_ch = spec.in_channels, len(spec.outputs)
    torch.manual_seed(inp.seed)
    # An ensemble's members draw their initial weights one after another from this seeded generator.
    net = build_ensemble(t.ensemble, t.model, in_ch, out_ch, spec.grid, field_input=spec.field_input, **arch)
    model = ray.train.torch.prepare_model(net)
    net = net.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=t.lr)
    # A restarted worker group (a rank died) goes on from the last checkpoint every rank reads: the
    # newer of Ray Train's (registered only once its controller has polled the report) and the one
    # rank 0 wrote into the study's directory in the store at its last validation.
    norm, resumed, resumed_from = Normaliser(), None, None
    ckpt_root = Path(inp.store) / PROGRESS_DIR / inp.study_id / "checkpoints"
    ckpt = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        candidates = [latest_state_dir(ckpt_root)]
        if ckpt is not None:
            candidates.append(Path(stack.enter_context(ckpt.as_directory())))
        best = max((c for c in candidates if c is not None), key=state_step, default=None)
        if best is not None and state_step(best) >= 0:
            norm, resumed, extra = load_training_state(best, net, opt)
            resumed_from = extra.get("version")
    if resumed is not None:
        log.warning("rank %d resumes at step %d (checkpoint of version %s)", rank, resumed.step, resumed_from)
        if rank == 0:
            prev = ray.get(control.training.remote())
            resumed_at = [*prev.get("resumed_at", []), resumed.step]
            ray.get(control.report_training.remote({"restarts": len(resumed_at), "resumed_at": resumed_at}))

    x_val_np, y_val_np = ray.get(inp.validation)
    mine = np.arange(rank, x_val_np.shape[0], world)  # this rank's slice of the validation set
    # np.array copies: object-store arrays are read-only
    x_val = torch.from_numpy(np.array(x_val_np[mine])).view(mine.size, *spec.in_shape).to(device)
    y_val = torch.from_numpy(np.array(y_val_np[mine])).view(mine.size, *spec.out_shape).to(device)
    # An ensemble fits its std_scale on the first half of the validation simulations (their samples come
    # simulation by simulation) and measures its coverage on the second.
    first_half = torch.from_numpy(mine < x_val_np.shape[0] // 2).to(device)
    calibration: list[Calibration | None] = [None]

    def validate() -> float:
        if t.ensemble == 1:
            return _validate(net, x_val, y_val, norm, world)
        err, calibration[0] = _validate_ensemble(net, x_val, y_val, norm, world, first_half)
        return err

    feed: ShardBatches | None = None
    offline_keys: list[Any] | None = None
    if inp.dataset:
        # Offline: this rank's share of the zarr dataset, epoch after epoch, read lazily.
        ds = Dataset(inp.dataset)
        ds.check_compatible(spec)
        offline_keys = [] if inp.record_keys else None
        source: Iterator[Any] = ds.epochs(
            t.batch_size, seed=inp.seed, device=device, rank=rank, world=world, keys=offline_keys
        )
    else:
        deadline = time.monotonic() + SHARD_WAIT_S
        while (shard := ray.get(control.shard.remote(rank))) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: no buffer shard after {SHARD_WAIT_S:.0f} s")
            time.sleep(0.1)
        feed = ShardBatches(shard, t.batch_size, device, spec.in_shape, spec.out_shape, with_ids=inp.sample_losses)
        if inp.record_keys:
            feed.keys = []
        source = iter(feed)
    batches = _agreed(source, world, device)
    t_start = time.perf_counter()
    first = next(batches, None)  # blocks until the shard reaches its watermark
    startup_wait = time.perf_counter() - t_start
    if first is None:
        return
    # Scalings from running statistics of the stream's first `norm_steps` steps, then fixed (saved in the card).

    def stream() -> Iterator[Any]:
        yield first
        yield from batches

    store = ModelStore(inp.store)
    last_report = [0.0]

    def stats_dict(s: LoopStats) -> dict[str, Any]:
        return {
            "step": s.step,
            "samples_seen": s.samples_seen,
            "loss": s.loss,
            "validation_error": s.validation_error,
            "data_wait_s": s.data_wait_s,
            "compute_s": s.compute_s,
            "startup_wait_s": startup_wait,
            "history": list(s.history),
            "time": time.time(),
            "nodes": sorted(set(nodes)),
            "workers": world,
        }

    def progress(s: LoopStats) -> None:
        now = time.perf_counter()
        if rank == 0 and now - last_report[0] > 0.5:
            last_report[0] = now
            control.report_training.remote(stats_dict(s))

    def on_validate(s: LoopStats) -> None:
        metrics = stats_dict(s)
        if rank == 0:
            card = make_card(
                problem=spec.to_dict(),
                model_name=t.model,
                arch=arch,
                in_channels=in_ch,
                out_channels=out_ch,
                grid=spec.grid,
                norm=norm,
                stats=s,  # samples_seen counts every rank's samples
                study_id=inp.study_id,
                field_input=spec.field_input,
                validation_set=inp.validation_set,
                sampler=inp.sampler,
                ensemble=calibration[0].to_dict() if calibration[0] is not None else None,
            )
            version = store.publish(inp.model_name, net, card)
            store.prune(inp.model_name, t.keep_versions, inp.study_id)
            metrics["version"] = version
            ray.get(control.report_training.remote(metrics))
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        # The same save serves and resumes: the version just published and the state it was trained to.
        checkpoint = None
        if rank == 0:
            saved = save_state_dir(
                ckpt_root,
                s.step,
                t.checkpoints_kept,
                model=net,
                opt=opt,
                norm=norm,
                stats=s,
                extra={"version": metrics.get("version")},
            )
            checkpoint = ray.train.Checkpoint.from_directory(str(saved))
        ray.train.report(numbers, checkpoint=checkpoint)

    # An adaptive sampler learns where the surrogate is wrong from the training losses of each simulation:
    # every rank sums them by simulation id and sends what it has every LOSS_REPORT_S (fire and forget).
    sim_losses = SimulationLosses()
    last_losses = [time.perf_counter()]

    def on_sample_losses(ids: np.ndarray, losses: np.ndarray) -> None:
        sim_losses.add(ids, losses)
        now = time.perf_counter()
        if now - last_losses[0] >= LOSS_REPORT_S:
            last_losses[0] = now
            control.report_sim_losses.remote(*sim_losses.drain())

    hooks = LoopHooks(
        validate=validate,
        on_progress=progress,
        on_validate=on_validate,
        reduce_moments=(lambda m: _reduce_moments(m, world)) if world > 1 else None,
        on_sample_losses=on_sample_losses if feed is not None and inp.sample_losses else None,
    )
    stats = run_loop(
        model,
        stream(),
        norm,
        schedule_of(t),
        hooks,
        validate_every=t.validate_every,
        norm_steps=t.norm_steps,
        field_input=spec.field_input,
        loss=t.loss,
        opt=opt,
        start=resumed,
    )
    if feed is not None:
        feed.close()
    if len(sim_losses):
        ray.get(control.report_sim_losses.remote(*sim_losses.drain()))
    state: dict[str, Any] = {
        "digest": weights_digest(net),
        "normalisation": norm.to_dict(),
        "steps": stats.step,
        "samples_seen": stats.samples_seen,
        "node": node,
    }
    recorded = feed.keys if feed is not None else offline_keys
    if recorded is not None:
        keys = [np.stack(k) for k in recorded] or [np.empty((2, 0), np.int64)]
        state["keys"] = np.concatenate(keys, axis=1)  # (2, n): sim_id, t_index of every row trained on
    ray.get(control.report_rank.remote(rank, state))
    if rank == 0:
        ray.get(control.report_training.remote({"finished": True}))


def validation_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """A short hash of the validation arrays: two studies validated on the same simulations share it."""
    h = hashlib.sha256()
    for a in (x, y):
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()[:16]


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
