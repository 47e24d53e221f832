"""The FNO paper's settings (Li et al., ICLR 2021) on Surge's own solvers' data, beside its published errors.

Burgers: s = 1024, 1000 training / 100 test simulations, FNO modes 16 width 64, batch 20, Adam 1e-3
halved every 50 epochs, 500 epochs. Darcy: s = 85, 1000 / 100, modes 12 width 32, batch 20, halved
every 100 epochs, 500 epochs. The FNO layers are the paper's (spectral convolution plus a pointwise
linear skip: ``channel_mlp: false``). The fully connected baseline (the paper's "FCN") is Surge's MLP
on the flattened input field. Then the same step budget trained online on fresh simulations.

    python benchmarks/fno_paper.py                 # the paper's 500 epochs (hours on a CPU)
    python benchmarks/fno_paper.py --epochs 20     # a reduced run, labelled as such in the table

A reduced run compresses the learning-rate schedule with the epochs (the same number of halvings,
10 for Burgers and 5 for Darcy), so that it ends at the paper's final learning rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, TEST_SEED, curves_figure, dataset, merge, run_study, test_error

from services.config import load_config, parse_config
from trainer.dataset import Dataset

PAPER = {  # test relative L2 published in the FNO paper (Tables 1 and 2)
    ("burgers1d", "fno"): 0.0160,
    ("burgers1d", "mlp"): 0.1877,
    ("darcy2d", "fno"): 0.0108,
    ("darcy2d", "mlp"): 0.0253,
}
SETTINGS = {
    "burgers1d": ("configs/burgers1d-fno.yaml", {"modes": 16, "width": 64, "layers": 4, "channel_mlp": False}, 50),
    "darcy2d": ("configs/darcy2d-fno.yaml", {"modes": 12, "width": 32, "layers": 4, "channel_mlp": False}, 100),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=500)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--problems", default="burgers1d,darcy2d")
    ap.add_argument(
        "--no-online", nargs="?", const="all", default="", help="skip the online runs (of all, or of PROBLEM,...)"
    )
    ap.add_argument("--work", default=None, help="folder for the datasets and model stores (default: a temp dir)")
    ap.add_argument("--resume", action="store_true", help="reuse datasets and finished runs already in --work")
    ap.add_argument("--figure", default=None, help="write a PNG of held-out error against steps")
    ap.add_argument("--json", default=None, help="write every run's figures and curves as JSON")
    args = ap.parse_args()
    if args.epochs < 1 or args.train < 20 or args.test < 1:
        raise SystemExit("--epochs >= 1, --train >= 20 (one batch) and --test >= 1")
    import ray

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="surge-fno-paper-"))
    work.mkdir(parents=True, exist_ok=True)
    label = "the paper's budget" if args.epochs == 500 else f"REDUCED: {args.epochs} of the paper's 500 epochs"
    print(f"FNO paper settings on Surge's solvers ({label}); stores in {work}")
    curves: dict[str, dict[str, list]] = {}
    report: dict[str, dict] = {"epochs": args.epochs, "train": args.train, "test": args.test}
    batch = 20
    steps_per_epoch = args.train // batch
    for prob in args.problems.split(","):
        path, fno_arch, halve_every = SETTINGS[prob]
        base = load_config(ROOT / path).model_dump()
        steps = args.epochs * steps_per_epoch
        training = {
            "batch_size": batch,
            "steps": steps,
            "lr": 1e-3,
            "warmup": 0,
            "schedule": "step",
            # the paper's halvings, spread over the epochs actually run
            "decay_every": max(1, round(halve_every * args.epochs / 500 * steps_per_epoch)),
            "decay_gamma": 0.5,
            "validate_every": max(steps_per_epoch, steps // 20),
        }
        cfg = parse_config(merge(base, {"training": training}))
        t0 = time.time()
        test = Dataset(dataset(cfg, args.test, work / f"{prob}-test.zarr", TEST_SEED, args.resume))
        train = dataset(cfg, args.train, work / f"{prob}-train.zarr", cfg.sampler.seed, args.resume)
        rows = []
        curves[prob] = {}
        for model, arch in (("fno", fno_arch), ("mlp", {"hidden": 512, "layers": 3})):
            store = work / f"{prob}-{model}"
            data = merge(base, {"name": f"{prob}-{model}", "dataset": str(train), "training": training})
            data["training"] = {**data["training"], "model": model, "arch": arch}
            wall, curves[prob][f"{model} offline"] = run_study(data, store, args.resume)
            rows.append(
                (
                    f"{model} offline, {args.train} sims",
                    test_error(store, cfg.served_name, test),
                    PAPER[(prob, model)],
                    wall,
                )
            )
        if args.no_online != "all" and prob not in args.no_online.split(","):
            store = work / f"{prob}-online"
            data = merge(base, {"name": f"{prob}-online", "training": training})
            data["training"] = {**data["training"], "model": "fno", "arch": fno_arch}
            wall, curves[prob]["fno online"] = run_study(data, store, args.resume)
            rows.append(
                ("fno online, fresh sims", test_error(store, cfg.served_name, test), PAPER[(prob, "fno")], wall)
            )
        print(f"\n{prob}: s = {test.spec.grid}, {steps} steps of batch {batch} ({time.time() - t0:.0f} s)")
        print(f"  {'run':<30}{'ours':>10}{'paper':>10}{'wall s':>9}")
        for name, ours, paper, wall in rows:
            print(f"  {name:<30}{ours:>10.4f}{paper:>10.4f}{wall:>9.0f}")
        report[prob] = {
            "grid": list(test.spec.grid),
            "steps": steps,
            "runs": {name: {"test_rel_l2": ours, "paper": paper, "wall_s": wall} for name, ours, paper, wall in rows},
            "curves": curves[prob],
        }
    ray.shutdown()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"results: {args.json}")
    if args.figure:
        curves_figure(curves, Path(args.figure))


if __name__ == "__main__":
    main()
