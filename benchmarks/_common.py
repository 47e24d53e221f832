"""Helpers shared by the benchmark scripts: run a study to its end, measure a model on a test set."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.config import StudyConfig, parse_config  # noqa: E402
from services.datasets import build_dataset  # noqa: E402
from services.metrics import PROGRESS_DIR  # noqa: E402
from trainer.dataset import Dataset, DatasetError  # noqa: E402
from trainer.loop import evaluate  # noqa: E402
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
    return evaluate(m.model, xt, yt, m.normaliser)


def dataset(cfg: StudyConfig, n: int, path: Path, seed: int, resume: bool = False) -> Path:
    """Build an ``n``-simulation zarr set at ``path``; with ``resume``, keep one already built there."""
    if resume and path.exists():
        try:
            ds = Dataset(path)
            ds.check_compatible(cfg.problem.spec())
            if ds.simulations == n and ds.attrs.get("sampler", {}).get("seed") == seed:
                return path
        except DatasetError:
            pass
    if path.exists():
        shutil.rmtree(path)
    return build_dataset(cfg, n, path, seed=seed)


def finished_run(store: Path, name: str, steps: int) -> tuple[float, list] | None:
    """(wall seconds, validation history) of study ``name`` that already ran ``steps`` steps in ``store``."""
    for f in sorted((store / PROGRESS_DIR).glob("*.json")):
        snap = json.loads(f.read_text())
        if snap["name"] == name and snap["state"] == "finished" and snap["training"]["step"] == steps:
            return snap["elapsed_s"], snap["training"]["history"]
    return None


def run_study(data: dict, store: Path, resume: bool = False) -> tuple[float, list]:
    """Run a study to its end in this process's Ray; returns (wall seconds, validation history).

    With ``resume``, a run that already finished in ``store`` is reported, not run again.
    """
    from services.study import Study

    if resume and (done := finished_run(store, data["name"], data["training"]["steps"])) is not None:
        print(f"  (resumed {data['name']} from {store})")
        return done
    if store.exists():
        shutil.rmtree(store)  # a half-finished run would leave older versions behind
    study = Study(parse_config(data), store).start()
    study.join()
    snap = study.snapshot()
    study.release()
    if snap["state"] != "finished":
        raise SystemExit(f"run {data['name']} ended {snap['state']}: {snap['error']}")
    if snap["training"]["step"] != data["training"]["steps"]:
        # e.g. a FIFO stream that ran out of simulations: the comparison would not be at equal steps
        print(f"  WARNING: run {data['name']} took {snap['training']['step']} of {data['training']['steps']} steps")
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
            ax.semilogy(h[:, 0], h[:, 1], label=label, ls="-" if "online" in label else "--")
        ax.set(title=prob, xlabel="gradient steps", ylabel="held-out validation rel. L2")
        ax.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"figure: {out}")
