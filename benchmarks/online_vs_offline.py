"""Melissa's experiment on Surge: the same model, optimiser, batch size and step count, trained
offline on N simulations read back from a zarr dataset (epochs), or online on fresh simulations
streamed from the solvers (FIFO and Reservoir buffers). Test error is measured on a held-out zarr
test set that no run trains on.

    python benchmarks/online_vs_offline.py [--steps 2000 | --steps heat2d-mlp=10000,darcy2d-fno=2000]
        [--sims 20,100,500] [--problems heat2d-mlp,...] [--figure results/online_vs_offline.png]
        [--json results/online_vs_offline.json]

Prints, per problem, the test relative L2 of every run and the improvement ``1 - online/offline``
of each buffer policy against each offline size. Every run goes through the same study code
(``services.study.Study``). The problems are shrunk to fit a laptop CPU (heat2d on 32², Darcy on
43², FNO layers without neuraloperator's channel MLP, as in the FNO paper).
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

PROBLEMS = {
    # name: (config, overrides that keep a run short on a laptop CPU)
    # simulations: enough that no FIFO stream runs dry before the step budget (every run takes every step).
    "heat2d-mlp": ("configs/heat2d-mlp.yaml", {"problem": {"config": {"n": 32}}, "simulations": 100_000}),
    "heat2d-fno": (
        "configs/heat2d-fno.yaml",
        {"problem": {"config": {"n": 32}}, "training": {"batch_size": 32, "arch": {"channel_mlp": False}}},
    ),
    "darcy2d-fno": (
        "configs/darcy2d-fno.yaml",
        {
            "problem": {"config": {"resolution": 43}},
            "training": {"arch": {"modes": 12, "width": 24, "channel_mlp": False}},
        },
    ),
}


def step_budgets(spec: str, problems: list[str]) -> dict[str, int]:
    """``2000`` (every problem) or ``heat2d-mlp=10000,darcy2d-fno=2000`` (per problem)."""
    if "=" not in spec:
        return dict.fromkeys(problems, int(spec))
    out = {k: int(v) for k, v in (item.split("=") for item in spec.split(","))}
    missing = sorted(set(problems) - set(out))
    if missing:
        raise SystemExit(f"--steps names no budget for {missing}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", default="2000", help="gradient steps per run, one number or PROBLEM=N,...")
    ap.add_argument("--sims", default="20,100,500", help="offline dataset sizes (simulations)")
    ap.add_argument("--test-sims", type=int, default=32)
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--policies", default="fifo,reservoir", help="online buffer policies to run")
    ap.add_argument("--figure", default=None, help="write a PNG of held-out error against steps")
    ap.add_argument("--json", default=None, help="write every run's figures and curves as JSON")
    ap.add_argument("--work", default=None, help="folder for the datasets and model stores (default: a temp dir)")
    ap.add_argument("--resume", action="store_true", help="reuse datasets and finished runs already in --work")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sims.split(",")]
    problems = args.problems.split(",")
    unknown = sorted(set(problems) - set(PROBLEMS))
    if unknown:
        raise SystemExit(f"unknown problem(s) {unknown}; known: {sorted(PROBLEMS)}")
    budgets = step_budgets(args.steps, problems)
    import ray

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="surge-ovo-"))
    work.mkdir(parents=True, exist_ok=True)
    curves: dict[str, dict[str, list]] = {}
    report: dict[str, dict] = {}
    print(f"steps per run {budgets}; offline sizes {sizes}; test set {args.test_sims} simulations; stores in {work}")
    for prob in problems:
        path, over = PROBLEMS[prob]
        steps = budgets[prob]
        base = merge(load_config(ROOT / path).model_dump(), over)
        base = merge(base, {"training": {"steps": steps, "validate_every": max(50, steps // 20)}})
        cfg = parse_config(base)
        t0 = time.time()
        test = Dataset(dataset(cfg, args.test_sims, work / f"{prob}-test.zarr", TEST_SEED, args.resume))
        rows, curves[prob] = [], {}
        for n in sizes:
            ds = dataset(cfg, n, work / f"{prob}-train-{n}.zarr", cfg.sampler.seed, args.resume)
            store = work / f"{prob}-off-{n}"
            wall, hist = run_study(merge(base, {"name": f"off{n}", "dataset": str(ds)}), store, args.resume)
            rows.append((f"offline, {n} simulations", test_error(store, cfg.served_name, test), wall))
            curves[prob][f"offline {n}"] = hist
        for policy in args.policies.split(","):
            store = work / f"{prob}-on-{policy}"
            cap = base["buffer"]["capacity"]
            data = merge(base, {"name": f"on-{policy}", "buffer": {"policy": policy, "capacity": cap}})
            wall, hist = run_study(data, store, args.resume)
            rows.append((f"online, {policy}", test_error(store, cfg.served_name, test), wall))
            curves[prob][f"online {policy}"] = hist
        print(f"\n{prob}: {steps} steps of batch {cfg.training.batch_size} ({time.time() - t0:.0f} s)")
        print(f"  {'run':<28}{'test rel. L2':>14}{'wall s':>9}")
        for name, err, wall in rows:
            print(f"  {name:<28}{err:>14.4f}{wall:>9.0f}")
        for on_name, on_err, _ in rows:
            if on_name.startswith("online"):
                gains = [f"vs {n.split(', ')[1]}: {1 - on_err / e:+.1%}" for n, e, _ in rows if n.startswith("offline")]
                print(f"  1 - online/offline, {on_name}: " + "; ".join(gains))
        report[prob] = {
            "steps": steps,
            "batch_size": cfg.training.batch_size,
            "runs": {name: {"test_rel_l2": err, "wall_s": wall} for name, err, wall in rows},
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
