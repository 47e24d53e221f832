"""An external solver feeding a running Surge study over gRPC, as a lab's own code would.

The solver is the user's: here the 2D heat equation u_t = alpha * Laplace(u) on the unit square
with fixed side temperatures (Melissa's use case), backward Euler on the 5-point Laplacian, in
numpy alone. Surge's part is five calls of ``services.ingest.client``: ``connect``,
``next_simulation``, ``send``, ``finish`` (and ``fail`` when the solver breaks down).

Start a study that takes external solvers (``ingest.enabled: true``; ``solvers.actors: 0`` to
let them alone feed it), then run one or more of these, on any machine that reaches the server:

    SURGE_INGEST_TOKEN=... python examples/external_solver.py heat2d-ext-1a2b3c4d --address host:50051

Each process asks the study for simulations (parameters and seed come from the study's sampler)
until the study needs no more, or ``--max-sims`` are done.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

import numpy as np

from services.ingest.client import IngestError, Simulation, connect


class HeatSolver:
    """Backward Euler for u_t = alpha * Laplace(u) on an n x n grid (boundary included), Dirichlet sides.

    The interior Laplacian is L U = D U + U D with D the 1D second difference; D = Q diag(lam) Q^T, so
    one implicit step is a division in Q's basis: (1 - alpha dt (lam_p + lam_q)) W_new = W + alpha dt B.
    """

    def __init__(self, n: int, alpha: float, dt: float, steps: int) -> None:
        self.n, self.alpha, self.dt, self.steps = n, alpha, dt, steps
        m, h = n - 2, 1.0 / (n - 1)
        d = (np.diag(np.full(m, -2.0)) + np.diag(np.ones(m - 1), 1) + np.diag(np.ones(m - 1), -1)) / h**2
        lam, self.q = np.linalg.eigh(d)  # d = q @ diag(lam) @ q.T
        self.gain = 1.0 / (1.0 - alpha * dt * (lam[:, None] + lam[None, :]))  # (m, m)
        self.h2 = h * h

    def run(self, u0: float, left: float, right: float, bottom: float, top: float) -> Iterator[np.ndarray]:
        """Yield the n x n temperature at t = k dt, k = 0..steps."""
        n, q = self.n, self.q
        u = np.empty((n, n))
        u[0, :], u[-1, :], u[:, 0], u[:, -1] = left, right, bottom, top
        u[0, 0], u[0, -1] = (left + bottom) / 2, (left + top) / 2  # corners: the mean of their two sides
        u[-1, 0], u[-1, -1] = (right + bottom) / 2, (right + top) / 2
        u[1:-1, 1:-1] = u0
        yield u.copy()
        b = np.zeros((n - 2, n - 2))  # the boundary's share of the 5-point stencil
        b[0, :] += left / self.h2
        b[-1, :] += right / self.h2
        b[:, 0] += bottom / self.h2
        b[:, -1] += top / self.h2
        w = q.T @ u[1:-1, 1:-1] @ q
        b_hat = self.alpha * self.dt * (q.T @ b @ q)
        for _ in range(self.steps):
            w = (w + b_hat) * self.gain
            u[1:-1, 1:-1] = q @ w @ q.T
            yield u.copy()


def run_simulation(sim: Simulation) -> int:
    """Solve one simulation and stream it; returns the samples the study accepted."""
    if sim.solver != "heat2d":
        raise SystemExit(f"this example solves heat2d; study wants {sim.solver}")
    cfg = {"n": 64, "alpha": 0.1, "dt": 0.01, "steps": 100, **sim.solver_config}
    solver = HeatSolver(cfg["n"], cfg["alpha"], cfg["dt"], cfg["steps"])
    p = sim.params
    with sim:  # an exception inside reports the simulation failed; leaving normally finishes it
        for k, u in enumerate(solver.run(p["u0"], p["t_left"], p["t_right"], p["t_bottom"], p["t_top"])):
            if sim.wants("u", k):
                sim.send("u", k, u)
        return sim.finish()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study_id")
    ap.add_argument("--address", default=os.environ.get("SURGE_GRPC_ADDRESS", "127.0.0.1:50051"))
    ap.add_argument("--token", default=os.environ.get("SURGE_INGEST_TOKEN"), help="default $SURGE_INGEST_TOKEN")
    ap.add_argument("--max-sims", type=int, default=None, help="stop after this many simulations")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    done = samples = 0
    t0 = time.perf_counter()
    with connect(args.address, args.token) as client:
        while args.max_sims is None or done < args.max_sims:
            try:
                sim = client.next_simulation(args.study_id)
            except IngestError as e:
                if e.code.name == "UNAVAILABLE" and done:
                    break  # the study has ended and its server with it
                raise
            if sim is None:
                break  # the study needs no more simulations
            samples += run_simulation(sim)
            done += 1
            if not args.quiet:
                print(f"simulation {sim.id} (attempt {sim.attempt}): sent", flush=True)
    dt = time.perf_counter() - t0
    print(f"done: {done} simulations, {samples} samples in {dt:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
