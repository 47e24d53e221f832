"""The training loop's pieces as plain functions; Ray Train workers only call them.

Training counts steps, not epochs: a stream has no length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainer.ensemble import bagged_loss, bagging_weights, members_of


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of some samples, mergeable across batches and ranks (Chan et al.'s pairwise
    update for the output's variance, plain float64 sums for the per-channel input statistics)."""

    count: int  # samples
    y_values: int  # output values (samples x values per sample)
    y_mean: float
    y_m2: float  # sum of squared deviations from y_mean
    x_sum: np.ndarray | None = None  # (C,) float64, field inputs only
    x_sq: np.ndarray | None = None  # (C,)
    x_cells: int = 0  # values per channel

    @classmethod
    def of(cls, x: np.ndarray | None, y: np.ndarray) -> Moments:
        """``y [B, ...]``; ``x [B, C, *grid]`` field inputs or None."""
        n = int(y.shape[0])
        if n == 0:
            return cls(0, 0, 0.0, 0.0)
        y64 = np.asarray(y, dtype=np.float64)
        mean = float(y64.mean())
        m2 = float(np.square(y64 - mean).sum())
        if x is None:
            return cls(n, int(y.size), mean, m2)
        axes = (0, *range(2, x.ndim))
        return cls(
            n,
            int(y.size),
            mean,
            m2,
            np.sum(x, axis=axes, dtype=np.float64),
            np.sum(np.square(x, dtype=np.float64), axis=axes),
            int(x.size // x.shape[1]),
        )

    def merge(self, other: Moments) -> Moments:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        na, nb = self.y_values, other.y_values
        delta = other.y_mean - self.y_mean
        mean = self.y_mean + delta * nb / (na + nb)
        m2 = self.y_m2 + other.y_m2 + delta**2 * na * nb / (na + nb)
        xs = xq = None
        if self.x_sum is not None and other.x_sum is not None:
            xs, xq = self.x_sum + other.x_sum, self.x_sq + other.x_sq  # type: ignore[operator]
        return Moments(self.count + other.count, na + nb, mean, m2, xs, xq, self.x_cells + other.x_cells)


@dataclass
class Normaliser:
    """Affine scalings saved in the model card: outputs ``y = mean + std * model(x')`` and, for
    field inputs, per-channel ``x' = (x - x_mean[c]) / x_std[c]`` (vector inputs are already in [0, 1])."""

    mean: float = 0.0
    std: float = 1.0
    x_mean: tuple[float, ...] | None = None
    x_std: tuple[float, ...] | None = None

    @classmethod
    def fit(cls, y: np.ndarray, x: np.ndarray | None = None) -> Normaliser:
        """``y`` any shape; ``x [N, C, *grid]`` field inputs or None."""
        std = float(np.std(y))
        norm = cls(mean=float(np.mean(y)), std=std if std > 0 else 1.0)
        if x is not None:
            axes = (0, *range(2, x.ndim))
            xs = np.std(x, axis=axes)
            norm.x_mean = tuple(float(v) for v in np.mean(x, axis=axes))
            # A constant channel (a fixed parameter, say) is centred but not scaled.
            norm.x_std = tuple(float(v) if v > 1e-12 else 1.0 for v in xs)
        return norm

    count: int = 0
    _y_values: int = 0
    _y_m2: float = 0.0
    _x_cells: int = 0
    _x_sum: np.ndarray | None = None
    _x_sq: np.ndarray | None = None

    def update(self, x: np.ndarray | None, y: np.ndarray) -> None:
        """Fold a batch into running means and variances: online statistics over the stream, no pass over a
        dataset needed. ``x`` is ``[B, C, *grid]`` field inputs or None."""
        self.absorb(Moments.of(x, y))

    def absorb(self, m: Moments) -> None:
        """Fold in the moments of some samples (one batch, or the union of every rank's batch of a step)."""
        if m.count == 0:
            return
        if self.count == 0:
            self.mean, self._y_m2, tot_values = m.y_mean, m.y_m2, m.y_values
        else:
            mine = Moments(self.count, self._y_values, self.mean, self._y_m2)
            both = mine.merge(Moments(m.count, m.y_values, m.y_mean, m.y_m2))
            self.mean, self._y_m2, tot_values = both.y_mean, both.y_m2, both.y_values
        self._y_values = tot_values
        std = float(np.sqrt(self._y_m2 / tot_values))
        self.std = std if std > 1e-12 else 1.0
        if m.x_sum is not None and m.x_sq is not None:
            self._x_sum = m.x_sum.copy() if self._x_sum is None else self._x_sum + m.x_sum
            self._x_sq = m.x_sq.copy() if self._x_sq is None else self._x_sq + m.x_sq
            self._x_cells += m.x_cells
            mean = self._x_sum / self._x_cells
            var = np.maximum(self._x_sq / self._x_cells - mean**2, 0.0)
            self.x_mean = tuple(float(a) for a in mean)
            # A constant channel (a fixed parameter, say) is centred but not scaled.
            self.x_std = tuple(float(np.sqrt(a)) if a > 1e-24 else 1.0 for a in var)
        self.count += m.count

    def encode_x(self, x: torch.Tensor) -> torch.Tensor:
        if self.x_mean is None or self.x_std is None:
            return x
        shape = (1, -1, *([1] * (x.ndim - 2)))
        m = torch.tensor(self.x_mean, dtype=x.dtype, device=x.device).view(shape)
        s = torch.tensor(self.x_std, dtype=x.dtype, device=x.device).view(shape)
        return (x - m) / s  # (B, C, *grid)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"y_mean": self.mean, "y_std": self.std}
        if self.x_mean is not None:
            d.update(x_mean=list(self.x_mean), x_std=list(self.x_std or ()))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normaliser:
        xm, xs = d.get("x_mean"), d.get("x_std")
        return cls(
            mean=float(d["y_mean"]),
            std=float(d["y_std"]),
            x_mean=tuple(float(v) for v in xm) if xm is not None else None,
            x_std=tuple(float(v) for v in xs) if xs is not None else None,
        )


def rel_l2_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target|| / ||target||`` of each sample ``(B,)``."""
    b = pred.shape[0]
    diff = (pred - target).reshape(b, -1).norm(dim=1)  # (B,)
    ref = target.reshape(b, -1).norm(dim=1).clamp_min(1e-12)  # (B,)
    return diff / ref


def rel_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of ``||pred - target|| / ||target||`` (the FNO paper's LpLoss, p=2)."""
    return rel_l2_per_sample(pred, target).mean()


def lr_at(
    step: int,
    base_lr: float,
    total_steps: int,
    warmup: int = 0,
    min_ratio: float = 0.05,
    schedule: str = "cosine",
    decay_every: int = 0,
    decay_gamma: float = 0.5,
) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * base_lr`` (``schedule="cosine"``) or a factor
    ``decay_gamma`` every ``decay_every`` steps (``"step"``, the FNO paper's StepLR)."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "step":
        return base_lr * decay_gamma ** ((step - warmup) // max(1, decay_every))
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'step', got {schedule!r}")
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every value."""
    return torch.mean((pred - target) ** 2)


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample ``(B,)``; their mean is ``mse`` (every sample has as many values)."""
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"rel_l2": rel_l2, "mse": mse}
# The same losses sample by sample: the mean of these is the loss above, to rounding.
PER_SAMPLE: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "rel_l2": rel_l2_per_sample,
    "mse": mse_per_sample,
}


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: Normaliser,
    lr: float,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = rel_l2,
    per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    keep: Callable[[torch.Tensor], None] | None = None,
) -> float:
    """One optimiser step on a batch; returns the loss (in physical units, relative L2 by default).

    With ``per_sample`` (the per-sample form of ``loss_fn``) the loss is the mean of the per-sample losses,
    which ``keep`` receives detached ``(B,)``: the losses of the batch the step trained on, for free."""
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    pred = norm.decode(model(norm.encode_x(x)))  # (B, C, *grid), or (K, B, C, *grid) for an ensemble
    if members_of(model):
        # Each member weighs the batch with its own Poisson(1) counts (online bagging); the loss reported
        # and kept is the members' plain mean, comparable with a single model's.
        k, b = pred.shape[0], pred.shape[1]
        target = y.reshape(1, b, *pred.shape[2:]).expand_as(pred).reshape(k * b, *pred.shape[2:])
        each = (per_sample or PER_SAMPLE[_loss_name(loss_fn)])(pred.reshape(k * b, *pred.shape[2:]), target)
        each = each.view(k, b)  # (K, B)
        loss = bagged_loss(each, bagging_weights(k, b, device=each.device))
        if keep is not None:
            keep(each.detach().mean(dim=0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(each.detach().mean())
    if per_sample is not None:
        each = per_sample(pred, y.view_as(pred))  # (B,)
        loss = each.mean()
        if keep is not None:
            keep(each.detach())
    else:
        loss = loss_fn(pred, y.view_as(pred))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())  # a CPU-GPU sync point, once per step


def _loss_name(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> str:
    for name, f in LOSSES.items():
        if f is fn:
            return name
    raise ValueError(f"an ensemble trains on a loss with a per-sample form ({sorted(PER_SAMPLE)})")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, norm: Normaliser, batch_size: int = 256
) -> float:
    """Relative L2 error over a held-out set (mean over samples); of the members' mean for an ensemble."""
    model.eval()
    total, n = 0.0, x.shape[0]
    ensemble = bool(members_of(model))
    for i in range(0, n, batch_size):
        pred = norm.decode(model(norm.encode_x(x[i : i + batch_size])))
        if ensemble:
            pred = pred.mean(dim=0)  # (b, C, *grid)
        total += float(rel_l2(pred, y[i : i + batch_size].view_as(pred))) * pred.shape[0]
    return total / max(1, n)


@dataclass
class LoopStats:
    step: int = 0
    samples_seen: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    loss: float = float("nan")
    validation_error: float = float("nan")
    history: list[tuple[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Schedule:
    """The learning-rate schedule of a run: :func:`lr_at` with its settings, the one definition used everywhere."""

    base_lr: float
    total_steps: int
    warmup: int = 0
    kind: str = "cosine"
    decay_every: int = 1000
    decay_gamma: float = 0.5
    min_ratio: float = 0.05

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "step"):
            raise ValueError(f"schedule must be 'cosine' or 'step', got {self.kind!r}")
        if self.total_steps < 1 or self.base_lr <= 0 or self.decay_every < 1:
            raise ValueError("a schedule needs total_steps >= 1, base_lr > 0 and decay_every >= 1")

    def lr(self, step: int) -> float:
        return lr_at(
            step,
            self.base_lr,
            self.total_steps,
            self.warmup,
            self.min_ratio,
            self.kind,
            self.decay_every,
            self.decay_gamma,
        )


@dataclass
class LoopHooks:
    """What the caller plugs into :func:`run_loop`.

    ``validate`` returns the held-out error; ``on_progress`` after every step, ``on_validate`` after
    every validation (checkpoints); ``should_stop`` is asked before each step; ``reduce_moments``
    turns one rank's batch statistics into those of every rank's batch of the step (data-parallel
    training: the normaliser must be the same on every rank).
    """

    validate: Callable[[], float]
    on_progress: Callable[[LoopStats], None] | None = None
    on_validate: Callable[[LoopStats], None] | None = None
    should_stop: Callable[[], bool] | None = None
    reduce_moments: Callable[[Moments], Moments] | None = None
    # ``(sim_ids [B], losses [B])`` of every step whose batch carries the simulation ids (adaptive sampling).
    on_sample_losses: Callable[[np.ndarray, np.ndarray], None] | None = None


class SimulationLosses:
    """Per-sample training losses summed by simulation id until drained: what a trainer rank reports to
    an adaptive sampler (one message per interval for every simulation seen, not one per sample)."""

    def __init__(self) -> None:
        self._sum: dict[int, float] = {}
        self._count: dict[int, int] = {}

    def add(self, sim_ids: np.ndarray, losses: np.ndarray) -> None:
        ids = np.asarray(sim_ids, dtype=np.int64).reshape(-1)
        loss = np.asarray(losses, dtype=np.float64).reshape(-1)
        if ids.shape != loss.shape:
            raise ValueError(f"sim_ids {list(ids.shape)} and losses {list(loss.shape)} must match")
        ok = np.isfinite(loss)
        uniq, inv = np.unique(ids[ok], return_inverse=True)
        sums = np.bincount(inv, weights=loss[ok], minlength=len(uniq))
        counts = np.bincount(inv, minlength=len(uniq))
        for i, total, c in zip(uniq.tolist(), sums.tolist(), counts.tolist(), strict=True):
            self._sum[i] = self._sum.get(i, 0.0) + total
            self._count[i] = self._count.get(i, 0) + c

    def __len__(self) -> int:
        return len(self._sum)

    def drain(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(sim_ids [n], mean losses [n], sample counts [n])`` since the last drain, then empty."""
        ids = np.fromiter(self._sum, dtype=np.int64, count=len(self._sum))
        means = np.array([self._sum[i] / self._count[i] for i in ids.tolist()], dtype=np.float64)
        counts = np.array([self._count[i] for i in ids.tolist()], dtype=np.int64)
        self._sum, self._count = {}, {}
        return ids, means, counts


def run_loop(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, ...] | None],
    norm: Normaliser,
    schedule: Schedule,
    hooks: LoopHooks,
    *,
    validate_every: int,
    norm_steps: int = 0,
    field_input: bool = False,
    loss: str = "rel_l2",
    opt: torch.optim.Optimizer | None = None,
    start: LoopStats | None = None,
) -> LoopStats:
    """Run ``schedule.total_steps`` optimiser steps over ``batches``; validate (and let the caller checkpoint)
    every ``validate_every`` steps.

    ``opt`` is the Adam optimiser over ``model`` (made here if not given); a resumed run passes the
    restored one with ``start``, the counters it had reached, and goes on from ``start.step``.

    A batch is ``(x, y)``, ``(x, y, rows)`` or ``(x, y, rows, sim_ids)``: ``rows`` counts the samples of the
    step over every rank (``samples_seen`` is then exact in data-parallel training); ``sim_ids [B]`` (numpy)
    name each row's simulation, and ``hooks.on_sample_losses`` then gets the step's per-sample losses.
    The iterator may yield ``None`` at the end of the stream; the loop then validates once more and stops.
    During the first ``norm_steps`` steps every batch also updates ``norm``'s running statistics.
    """
    steps = schedule.total_steps
    if opt is None:
        opt = torch.optim.Adam(model.parameters(), lr=schedule.base_lr)
    loss_fn = LOSSES[loss]
    per_sample = PER_SAMPLE[loss] if hooks.on_sample_losses is not None else None
    stats = start if start is not None else LoopStats()
    it = iter(batches)

    def validate() -> None:
        stats.validation_error = hooks.validate()
        stats.history.append((stats.step, stats.validation_error))
        if hooks.on_validate is not None:
            hooks.on_validate(stats)

    while stats.step < steps:
        if hooks.should_stop is not None and hooks.should_stop():
            break
        t0 = time.perf_counter()
        batch = next(it, None)
        t1 = time.perf_counter()
        stats.data_wait_s += t1 - t0
        if batch is None:
            break
        x, y = batch[0], batch[1]
        rows = int(batch[2]) if len(batch) > 2 else int(x.shape[0])
        if stats.step < norm_steps:
            # The first steps refine the normalisation statistics from the stream itself, then they are frozen.
            m = Moments.of(x.detach().cpu().numpy() if field_input else None, y.detach().cpu().numpy())
            norm.absorb(hooks.reduce_moments(m) if hooks.reduce_moments is not None else m)
        kept: list[torch.Tensor] = []
        ids = batch[3] if per_sample is not None and len(batch) > 3 else None
        stats.loss = train_step(
            model,
            opt,
            x,
            y,
            norm,
            schedule.lr(stats.step),
            loss_fn,
            per_sample if ids is not None else None,
            kept.append if ids is not None else None,
        )
        if ids is not None and kept and hooks.on_sample_losses is not None:
            hooks.on_sample_losses(np.asarray(ids), kept[0].float().cpu().numpy())
        stats.compute_s += time.perf_counter() - t1
        stats.step += 1
        stats.samples_seen += rows
        if hooks.on_progress is not None:
            hooks.on_progress(stats)
        if stats.step % validate_every == 0 or stats.step == steps:
            validate()
    if not stats.history or stats.history[-1][0] != stats.step:
        validate()
    return stats


def make_card(
    *,
    problem: dict[str, Any],
    model_name: str,
    arch: dict[str, Any],
    in_channels: int,
    out_channels: int,
    grid: tuple[int, ...],
    norm: Normaliser,
    stats: LoopStats,
    study_id: str,
    field_input: bool = False,
    validation_set: str | None = None,
    sampler: dict[str, Any] | None = None,
    ensemble: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card (see DESIGN: model store). ``validation_set`` fingerprints the simulations the
    validation error was measured on: errors of two versions compare only when it is the same.
    ``ensemble`` (``trainer.ensemble.Calibration.to_dict``): the members and their calibration."""
    return {
        "problem": problem,
        "model": {
            "name": model_name,
            "arch": dict(arch),
            "in_channels": in_channels,
            "out_channels": out_channels,
            "grid": list(grid),
            "field_input": field_input,
        },
        "input_shape": [in_channels, *grid] if field_input else [in_channels],
        "output_shape": [out_channels, *grid],
        "normalisation": norm.to_dict(),
        "samples_seen": stats.samples_seen,
        "train_steps": stats.step,
        "train_loss": _finite_or_none(stats.loss),
        "validation_error": _finite_or_none(stats.validation_error),
        "study_id": study_id,
        "validation_set": validation_set,
        **({"sampler": dict(sampler)} if sampler else {}),
        **({"ensemble": dict(ensemble)} if ensemble else {}),
        "format": "safetensors",
    }


def _finite_or_none(v: float) -> float | None:
    """JSON has no NaN: a value not measured yet is null in the card."""
    return float(v) if math.isfinite(v) else None


def pick_device(use_gpu: bool) -> torch.device:
    """CUDA when asked for and present, else CPU."""
    return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


__all__ = [
    "LoopHooks",
    "LoopStats",
    "Moments",
    "Normaliser",
    "Schedule",
    "SimulationLosses",
    "evaluate",
    "lr_at",
    "make_card",
    "pick_device",
    "rel_l2",
    "run_loop",
    "train_step",
]
