"""Helpers shared by the benchmark scripts: run a study to its end, measure a model on a test set."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.config import parse_config  # noqa: E402
from trainer.dataset import Dataset  # noqa: E402
from trainer.loop import Normaliser, evaluate  # noqa: E402
from trainer.store import ModelStore  # noqa: E402

TEST_SEED = 7_777_777  # test sets' sampler seed: never a training or validation seed


def merge(base: dict, over: dict) -> dict:
    """Nested dict update (study config overrides)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def test_error(store: Path, name: str, test: Dataset) -> float:
    """Relative L2 of the newest version of model ``name`` on every sample of ``test``."""
    m = ModelStore(store).load(name)
    x, y = test.arrays()
    xt = torch.from_numpy(x).view(len(test), *test.spec.in_shape)
    yt = torch.from_numpy(y).view(len(test), *test.spec.out_shape)
    return evaluate(m.model, xt, yt, Normaliser.from_dict(m.card["normalisation"]))


def run_study(data: dict, store: Path) -> tuple[float, list]:
    """Run a study to its end in this process's Ray; returns (wall seconds, validation history)."""
    from services.study import Study

    study = Study(parse_config(data), store).start()
    study.join()
    snap = study.snapshot()
    study.release()
    if snap["state"] != "finished":
        raise SystemExit(f"run {data['name']} ended {snap['state']}: {snap['error']}")
    return snap["elapsed_s"], snap["training"]["history"]


def curves_figure(curves: dict, out: Path) -> None:
    """Validation error against gradient steps, one panel per problem, online solid, offline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (prob, runs) in zip(axes[0], curves.items(), strict=True):
        for label, hist in runs.items():
            h = np.array(hist)
            ax.semilogy(h[:, 0], h[:, 1], label=label, ls="-" if label.startswith("online") else "--")
        ax.set(title=prob, xlabel="gradient steps", ylabel="held-out validation rel. L2")
        ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"figure: {out}")
