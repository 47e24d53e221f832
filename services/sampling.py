"""Parameter samplers for a study: each simulation id maps to one parameter set and seed."""

from __future__ import annotations

import numpy as np
from scipy.stats import qmc

from solvers.base import ParamSpace


class Sampler:
    """Draws parameter sets in order; ``uniform`` (pseudo-random) or ``sobol`` (scrambled, low discrepancy)."""

    def __init__(self, space: ParamSpace, kind: str = "uniform", seed: int = 0) -> None:
        if kind not in ("uniform", "sobol"):
            raise ValueError(f"sampler.kind must be 'uniform' or 'sobol', got {kind!r}")
        self.space = space
        self.kind = kind
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        # A solver without scalar parameters (its inputs are random fields drawn from the seed) has dim 0.
        self._sobol = qmc.Sobol(d=space.dim, scramble=True, seed=seed) if kind == "sobol" and space.dim else None

    def draw(self, n: int) -> np.ndarray:
        """The next ``n`` parameter sets ``[n, P]``."""
        unit = self._sobol.random(n) if self._sobol is not None else self._rng.random((n, self.space.dim))
        return self.space.scale(unit)


def simulation_seeds(base_seed: int, sim_ids: np.ndarray) -> np.ndarray:
    """A solver seed per simulation id, independent of which actor runs it or how often."""
    ss = np.random.SeedSequence(base_seed)
    # Negative ids (held-out simulations) wrap into the unsigned range SeedSequence wants.
    keys = [int(i) % 2**64 for i in sim_ids]
    return np.array([np.random.SeedSequence([ss.entropy, k]).generate_state(1)[0] for k in keys], np.int64)
