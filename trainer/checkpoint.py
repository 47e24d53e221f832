"""A training run's state for resuming: model, optimiser, normaliser, loop counters and RNG.

Written as ``state.safetensors`` (every tensor and array) beside ``state.json`` (everything else),
so that reading it back never unpickles anything. The normaliser is saved with its running
moments, so a run resumed before its ``norm_steps`` were over goes on refining the same statistics.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.loop import LoopStats, Normaliser

STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"
FORMAT = "surge-training-state"


class CheckpointError(ValueError):
    """A training state that cannot be resumed from: missing, foreign, or of another model."""


def save_training_state(
    directory: str | Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    norm: Normaliser,
    stats: LoopStats,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the state of a run after ``stats.step`` steps into ``directory`` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):  # some layers keep non-tensor extra state; build_model restores it
            tensors[f"model.{k}"] = v.detach().cpu().contiguous()
    osd = opt.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[k] = v
    for name in ("_x_sum", "_x_sq"):
        arr = getattr(norm, name)
        if arr is not None:
            tensors[f"norm.{name}"] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {
        "format": FORMAT,
        "optimizer": {"param_groups": osd["param_groups"], "scalars": opt_scalars, "states": list(osd["state"])},
        "normaliser": {
            "mean": norm.mean,
            "std": norm.std,
            "x_mean": list(norm.x_mean) if norm.x_mean is not None else None,
            "x_std": list(norm.x_std) if norm.x_std is not None else None,
            "count": norm.count,
            "y_values": norm._y_values,
            "y_m2": norm._y_m2,
            "x_cells": norm._x_cells,
        },
        "stats": {**asdict(stats), "history": [list(h) for h in stats.history]},
        "extra": extra or {},
    }
    # Tensors first, the JSON last: a directory with a readable state.json is complete.
    save_file(tensors, str(d / STATE_TENSORS))
    (d / STATE_META).write_text(json.dumps(meta))


def load_training_state(
    directory: str | Path, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[Normaliser, LoopStats, dict[str, Any]]:
    """Restore ``model`` and ``opt`` in place from ``directory``; returns the normaliser, the loop's
    counters and the ``extra`` saved with them. Raises :class:`CheckpointError` for a state that
    does not fit."""
    d = Path(directory)
    try:
        meta = json.loads((d / STATE_META).read_text())
        tensors = load_file(str(d / STATE_TENSORS))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no readable training state in {d}: {e}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{d} does not hold a Surge training state")
    weights = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    own = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    if set(weights) != own:
        raise CheckpointError(f"{d} holds the weights of another model")
    try:
        model.load_state_dict(weights, strict=False)  # strict but for non-tensor extra state (checked above)
    except RuntimeError as e:  # shapes that differ
        raise CheckpointError(f"{d} holds the weights of another model: {e}") from None
    o = meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for idx in o["states"]:
        entry = dict(o["scalars"].get(str(idx), {}))
        prefix = f"opt.{idx}."
        entry.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        state[int(idx)] = entry
    try:
        opt.load_state_dict({"state": state, "param_groups": o["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{d}: optimiser state does not fit: {e}") from None
    n = meta["normaliser"]
    norm = Normaliser(
        mean=float(n["mean"]),
        std=float(n["std"]),
        x_mean=tuple(n["x_mean"]) if n["x_mean"] is not None else None,
        x_std=tuple(n["x_std"]) if n["x_std"] is not None else None,
    )
    norm.count, norm._y_values, norm._y_m2, norm._x_cells = (
        int(n["count"]),
        int(n["y_values"]),
        float(n["y_m2"]),
        int(n["x_cells"]),
    )
    for name in ("_x_sum", "_x_sq"):
        if f"norm.{name}" in tensors:
            setattr(norm, name, tensors[f"norm.{name}"].numpy().copy())
    s = meta["stats"]
    stats = LoopStats(**{**s, "history": [tuple(h) for h in s["history"]]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    return norm, stats, dict(meta.get("extra", {}))


def state_step(directory: str | Path) -> int:
    """The step a saved state was taken at (-1 when there is no readable state)."""
    try:
        return int(json.loads((Path(directory) / STATE_META).read_text())["stats"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def save_state_dir(root: str | Path, step: int, keep: int, **state: Any) -> Path:
    """Save a state as ``root/step-<step>`` (written aside, then renamed into place, so a reader sees
    whole states only) and keep the newest ``keep``; returns its directory. ``state`` are the
    arguments of :func:`save_training_state`."""
    root = Path(root)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}"
    save_training_state(tmp, **state)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state_dir(root: str | Path) -> Path | None:
    """The newest whole state under ``root``, or None."""
    for d in sorted(Path(root).glob("step-*"), reverse=True):
        if state_step(d) >= 0:
            return d
    return None
