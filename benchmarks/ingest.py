"""External solvers over gRPC vs in-cluster solver actors: samples/s and MB/s into the buffer, side by side.

For each field size (64² and 1000² float32) the same volume (simulations x recorded steps) goes into a
study's buffer actor twice, with the solving left out so that only the transport is measured:

  * ``actors``: Ray actors that hold one precomputed trajectory and put its samples as a SolverActor does
    after solving: through the problem's StepAssembler, ``sims_per_call`` simulations x ``chunk_steps``
    recorded steps per put (8 x 10 for 64², 1 x 10 for 1000²);
  * ``external``: client processes that stream the same trajectory over gRPC with ``services.ingest.client``
    into a real ingest server (credit, checks, staging, StepAssembler at End, the same puts).

Each with 1 and with ``--clients`` producers. The buffer is a reservoir (never blocks, bounded memory), so
nothing waits on a trainer. Prints the ratio external/actors measured in one run, and how close the 1000²
figures come to Melissa's SC'23 ingest (about 150 samples/s of 10⁶-value fields, 600 MB/s).

    python benchmarks/ingest.py [--clients 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench"
MELISSA_SAMPLES_PER_S = 150.0  # SC'23: 10⁶-value fields into 4 GPUs
MELISSA_MB_PER_S = 600.0


def trajectory(grid: int, steps: int) -> np.ndarray:
    """One simulation's recorded fields ``[T+1, 1, g, g]`` float32 (any finite values do)."""
    base = np.linspace(100.0, 500.0, grid * grid, dtype=np.float32).reshape(1, grid, grid)
    return np.stack([base + k for k in range(steps + 1)])


# The external client (run as a separate process: ``python benchmarks/ingest.py --client ADDRESS STUDY``).
def client_main(address: str, study_id: str) -> None:
    from services.ingest.client import connect

    traj: np.ndarray | None = None
    with connect(address, TOKEN, max_message_mb=64) as client:
        while (sim := client.next_simulation(study_id, wait_s=120)) is not None:
            if traj is None:
                traj = trajectory(sim.grid[0], len(sim.times) - 1)
            for k in sim.required["u"]:
                sim.send("u", k, traj[k, 0])
            sim.finish()


def measure_external(spec, sims: int, clients: int, batch: int, chunk_steps: int) -> float:
    """Seconds from the first simulation handed out to the last one in the buffer."""
    import ray

    from services.config import IngestConfig
    from services.ingest.server import StudyFeed, release, serve
    from services.sampling import Sampler
    from services.study import SimulationIds

    buffer = _buffer(spec)
    ids = SimulationIds(Sampler(spec.params, "uniform", 0), 0, sims)
    times: list[float] = []
    lock = threading.Lock()

    def on_event(kind: str, sim_id: int, produced: int = 0) -> None:
        with lock:
            times.append(time.perf_counter())

    sim_mb = (len(spec.times) * int(np.prod(spec.grid)) * 4) / 2**20
    cfg = IngestConfig(enabled=True, port=0, max_message_mb=64, max_staged_mb=max(256.0, 2 * clients * sim_mb))
    from services.dataplane import ShardRouter

    feed = StudyFeed("bench", spec, ShardRouter([buffer]), ids, cfg, on_event)
    srv = serve("127.0.0.1", 0, token=TOKEN, max_message_bytes=64 * 2**20)
    srv.attach(feed)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--client", srv.address, "bench"], env=env) for _ in range(clients)
    ]
    for p in procs:
        p.wait()
    st = feed.stats()
    srv.detach(feed)
    release(srv)
    got = ray.get(buffer.stats.remote())["received"]
    ray.kill(buffer)
    assert st["done"] == sims and got == sims * len(spec.times), (st, got)
    return times[-1] - times[0]


def measure_actors(spec, sims: int, actors: int, batch: int, chunk_steps: int) -> float:
    import ray

    @ray.remote
    class Pusher:
        """A solver actor minus the solving: one precomputed trajectory, put as SolverActor puts it."""

        def __init__(self, problem: dict, buffer, chunk_steps: int) -> None:
            from trainer.problem import ProblemSpec

            self.spec = ProblemSpec.from_dict(problem)
            from services.dataplane import ShardRouter

            self.router, self.chunk_steps = ShardRouter([buffer], group=1), chunk_steps
            self.traj = trajectory(self.spec.grid[0], len(self.spec.times) - 1)

        def ready(self) -> bool:
            return True

        def run(self, sim_ids: list[int], batch: int) -> int:
            mid = (np.asarray(self.spec.params.low) + np.asarray(self.spec.params.high)) / 2
            n = 0
            for b in range(0, len(sim_ids), batch):
                ids = np.asarray(sim_ids[b : b + batch])
                asm = self.spec.assembler(np.tile(mid, (len(ids), 1)), ids)
                parts = []
                for k in range(len(self.spec.times)):
                    fields = np.broadcast_to(self.traj[k][None], (len(ids), *self.traj[k].shape))  # (B, 1, g, g)
                    if (s := asm.feed(k, fields)) is not None:
                        parts.append(s)
                    if parts and (len(parts) >= self.chunk_steps or k == len(self.spec.times) - 1):
                        x, y, i, t = (np.concatenate(a) for a in zip(*parts, strict=True))
                        parts.clear()
                        self.router.put(x, y, i, t)
                        n += x.shape[0]
            return n

    buffer = _buffer(spec)
    pushers = [Pusher.options(num_cpus=0).remote(spec.to_dict(), buffer, chunk_steps) for _ in range(actors)]
    ray.get([p.ready.remote() for p in pushers])
    shares = np.array_split(np.arange(sims), actors)
    t0 = time.perf_counter()
    n = sum(ray.get([p.run.remote(s.tolist(), batch) for p, s in zip(pushers, shares, strict=True)]))
    dt = time.perf_counter() - t0
    got = ray.get(buffer.stats.remote())["received"]
    for a in [*pushers, buffer]:
        ray.kill(a)
    assert n == got == sims * len(spec.times), (n, got)
    return dt


def _buffer(spec):
    from services.actors import BufferShard

    per_sample = int(np.prod(spec.grid)) * 4
    capacity = max(16, min(4096, (512 * 2**20) // per_sample))  # at most ~512 MB held
    return BufferShard.options(num_cpus=0).remote("reservoir", capacity, 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--client", nargs=2, metavar=("ADDRESS", "STUDY"), help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, default=3, help="producers in the 'several' case")
    ap.add_argument("--chunk-steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="smaller volumes")
    args = ap.parse_args()
    if args.client:
        client_main(*args.client)
        return 0

    import ray

    import solvers
    from trainer.problem import ProblemSpec

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    # (grid, recorded steps, simulations, sims_per_call of the actors): the same volume both ways.
    cases = [(64, 20, 64 if args.quick else 320, 8), (1000, 10, 6 if args.quick else 30, 1)]
    print(f"cpus: {os.cpu_count()}, chunk_steps: {args.chunk_steps}; payload = the y field, float32")
    print(
        f"{'field':>7} {'producers':>9} {'way':>9} {'samples':>8} {'s':>7} {'samples/s':>10} {'MB/s':>8} {'ext/act':>8}"
    )
    rows = {}
    for grid, steps, sims, batch in cases:
        cfg = {"n": grid, "steps": steps, "dt": 0.01}
        spec = ProblemSpec.from_solver(solvers.get("heat2d", **cfg), cfg)
        n = sims * (steps + 1)
        mb = n * grid * grid * 4 / 1e6
        for producers in (1, args.clients):
            out = {}
            for way, fn in (("actors", measure_actors), ("external", measure_external)):
                dt = fn(spec, sims, producers, batch, args.chunk_steps)
                out[way] = dt
                ratio = f"{out['actors'] / dt:8.2f}" if way == "external" else ""
                print(f"{grid:>5}² {producers:>9} {way:>9} {n:>8} {dt:>7.2f} {n / dt:>10.0f} {mb / dt:>8.0f} {ratio}")
            rows[(grid, producers)] = (n / out["external"], mb / out["external"], n / out["actors"], mb / out["actors"])
    ext = max((rows[(1000, p)][:2] for p in (1, args.clients)), key=lambda r: r[0])
    act = max((rows[(1000, p)][2:] for p in (1, args.clients)), key=lambda r: r[0])
    print(
        f"\n1000² fields on this {os.cpu_count()}-core machine, best of 1 and {args.clients} producers: "
        f"external {ext[0]:.0f} samples/s ({ext[1]:.0f} MB/s) = {ext[0] / MELISSA_SAMPLES_PER_S:.0%} of Melissa's "
        f"~{MELISSA_SAMPLES_PER_S:.0f} samples/s (~{MELISSA_MB_PER_S:.0f} MB/s); "
        f"in-cluster actors {act[0]:.0f} samples/s ({act[1]:.0f} MB/s)"
    )
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
