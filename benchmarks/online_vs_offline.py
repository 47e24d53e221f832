"""Melissa's experiment on Surge: the same model, optimiser, batch size and step count, trained
offline on N simulations read back from a zarr dataset (epochs), or online on fresh simulations
streamed from the solvers (FIFO and Reservoir buffers). Test error is measured on a held-out zarr
test set that no run trains on.

    python benchmarks/online_vs_offline.py [--steps 2000] [--sims 25,100,400] [--problems heat2d-mlp,...]
        [--figure results/online_vs_offline.png]

Prints, per problem, the test relative L2 of every run and the improvement ``1 - online/offline``
against each offline size. Every run goes through the same study code (``services.study.Study``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, TEST_SEED, curves_figure, merge, run_study, test_error

from services.config import load_config, parse_config
from services.datasets import build_dataset
from trainer.dataset import Dataset

PROBLEMS = {
    # name: (config, overrides that keep a run short on a laptop CPU)
    "heat2d-mlp": ("configs/heat2d-mlp.yaml", {"problem": {"config": {"n": 32}}}),
    "heat2d-fno": ("configs/heat2d-fno.yaml", {"problem": {"config": {"n": 32}}, "training": {"batch_size": 32}}),
    "darcy2d-fno": ("configs/darcy2d-fno.yaml", {"training": {"arch": {"modes": 12, "width": 24}}}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--sims", default="25,100,400", help="offline dataset sizes (simulations)")
    ap.add_argument("--test-sims", type=int, default=32)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--figure", default=None, help="write a PNG of test error against steps")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sims.split(",")]
    import ray

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="surge-ovo-"))
    curves: dict[str, dict[str, list]] = {}
    print(f"{args.steps} steps per run; offline sizes {sizes}; test set {args.test_sims} simulations")
    for prob in args.problems.split(","):
        path, over = PROBLEMS[prob]
        base = merge(load_config(ROOT / path).model_dump(), over)
        base = merge(base, {"training": {"steps": args.steps, "validate_every": max(50, args.steps // 10)}})
        cfg = parse_config(base)
        t0 = time.time()
        test = Dataset(build_dataset(cfg, args.test_sims, work / f"{prob}-test.zarr", seed=TEST_SEED))
        rows, curves[prob] = [], {}
        for n in sizes:
            ds = build_dataset(cfg, n, work / f"{prob}-train-{n}.zarr", seed=cfg.sampler.seed)
            store = work / f"{prob}-off-{n}"
            wall, hist = run_study(merge(base, {"name": f"off{n}", "dataset": str(ds)}), store)
            rows.append((f"offline, {n} simulations", test_error(store, cfg.served_name, test), wall))
            curves[prob][f"offline {n}"] = hist
        for policy in ("fifo", "reservoir"):
            store = work / f"{prob}-on-{policy}"
            cap = base["buffer"]["capacity"]
            data = merge(base, {"name": f"on-{policy}", "buffer": {"policy": policy, "capacity": cap}})
            wall, hist = run_study(data, store)
            rows.append((f"online, {policy}", test_error(store, cfg.served_name, test), wall))
            curves[prob][f"online {policy}"] = hist
        print(f"\n{prob} ({time.time() - t0:.0f} s)")
        print(f"  {'run':<28}{'test rel. L2':>14}{'wall s':>9}")
        for name, err, wall in rows:
            print(f"  {name:<28}{err:>14.4f}{wall:>9.0f}")
        best_online = min(e for n, e, _ in rows if n.startswith("online"))
        for name, err, _ in rows:
            if name.startswith("offline"):
                print(f"  improvement 1 - online/offline vs {name}: {1 - best_online / err:+.1%}")
    ray.shutdown()
    if args.figure:
        curves_figure(curves, Path(args.figure))


if __name__ == "__main__":
    main()
