"""A served model's prediction next to the solver's answer and their difference, for one test case.

    python benchmarks/plot_prediction.py STORE MODEL TEST.zarr OUT.png [--index 0]

``STORE`` is a model store (e.g. one a benchmark run wrote), ``TEST.zarr`` a test set built with
``surge dataset build`` (or by the benchmarks) for the same problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.dataset import Dataset
from trainer.store import ModelStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("model")
    ap.add_argument("test")
    ap.add_argument("out")
    ap.add_argument("--index", type=int, default=0, help="which test sample")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = ModelStore(args.store).load(args.model)
    test = Dataset(args.test)
    test.check_compatible(m.spec)
    x = torch.from_numpy(np.asarray(test.x[args.index : args.index + 1]))
    truth = np.asarray(test.y[args.index])[0]  # first output channel, (*grid)
    norm = m.normaliser
    with torch.no_grad():
        pred = norm.decode(m.model(norm.encode_x(x))).numpy()[0, 0]
    err = np.linalg.norm(pred - truth) / np.linalg.norm(truth)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    if truth.ndim == 1:
        xs = np.linspace(0, 1, truth.size)
        axes[0].plot(xs, truth)
        axes[1].plot(xs, pred)
        axes[2].plot(xs, pred - truth)
    else:
        lo, hi = float(truth.min()), float(truth.max())
        for ax, a in zip(axes[:2], (truth, pred), strict=True):
            fig.colorbar(ax.imshow(a.T, origin="lower", vmin=lo, vmax=hi, cmap="viridis"), ax=ax)
        d = float(np.abs(pred - truth).max())  # symmetric limits: white is zero
        fig.colorbar(axes[2].imshow((pred - truth).T, origin="lower", cmap="RdBu_r", vmin=-d, vmax=d), ax=axes[2])
    for ax, title in zip(
        axes, ("solver", f"{args.model} v{m.version}", f"difference (rel. L2 {err:.3f})"), strict=True
    ):
        ax.set_title(title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"{args.out}: relative L2 {err:.4f}")


if __name__ == "__main__":
    main()
