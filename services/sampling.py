"""Parameter samplers for a study: each simulation id maps to one parameter set and seed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import qmc

from services.queries import QuerySampler
from solvers.base import ParamSpace

log = logging.getLogger("surge.sampling")


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

    # Draws do not depend on what training reports: a resumed study redraws them from the seed.
    adaptive = False

    def observe(self, params: np.ndarray, losses: np.ndarray) -> None:
        """Training losses per simulation; uniform and Sobol draws ignore them."""

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


class BreedSampler:
    """Melissa's loss-driven "breed" sampler: new points near those the surrogate gets most wrong.

    Each draw breeds a fraction of its points and draws the rest uniformly. A bred point is a
    Gaussian mutation (std ``sigma`` in the unit cube, so relative to each parameter's range) of a
    parent picked from the recent history with probability proportional to its training loss. The
    bred fraction ramps linearly from ``start`` to ``end`` over the first ``breakpoint`` simulations
    drawn after the first losses arrive (Melissa counts breeding rounds; a stream has no rounds).
    ``use_true_mixing`` keeps Melissa's meaning: exactly ``round(fraction * n)`` of a draw of ``n`` are
    bred, at random positions; otherwise each point is bred independently with that probability.
    """

    # Draws depend on the losses observed so far: the ledger journals the points drawn, and a resumed
    # study replays those rather than redrawing.
    adaptive = True
    kind = "breed"

    def __init__(
        self,
        space: ParamSpace,
        seed: int = 0,
        sigma: float = 0.005,
        start: float = 0.15,
        end: float = 0.75,
        breakpoint: int = 100,
        use_true_mixing: bool = False,
        max_retries: int = 10,
        history: int = 1000,
    ) -> None:
        if not (np.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be finite and > 0 (a fraction of each parameter's range), got {sigma}")
        if not (0.0 <= start <= end <= 1.0):
            raise ValueError(f"start and end must satisfy 0 <= start <= end <= 1, got start={start}, end={end}")
        for name, value, least in (
            ("breakpoint", breakpoint, 1),
            ("max_retries", max_retries, 0),
            ("history", history, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.space = space
        self.seed = seed
        self.sigma = float(sigma)
        self.start = float(start)
        self.end = float(end)
        self.breakpoint = int(breakpoint)
        self.use_true_mixing = bool(use_true_mixing)
        self.max_retries = int(max_retries)
        self.history = int(history)
        # One generator for every random choice, so the same seed and calls give the same points.
        self._rng = np.random.default_rng(seed)
        # Latest loss per point ``(params [P], loss)``, oldest first; keyed by the point's bytes so that a
        # re-observed point replaces its old loss and moves to the end.
        self._points: dict[bytes, tuple[np.ndarray, float]] = {}
        self._drawn = 0  # simulations drawn since the first losses arrived

    def observe(self, params: np.ndarray, losses: np.ndarray) -> None:
        """Record the training loss of each simulation: ``params [n, P]``, ``losses [n]`` (finite, >= 0)."""
        p = self.space.check(params)
        loss = np.asarray(losses, dtype=np.float64)
        if loss.shape != (p.shape[0],):
            raise ValueError(f"losses must have shape [{p.shape[0]}] (one per parameter set), got {list(loss.shape)}")
        bad = ~(np.isfinite(loss) & (loss >= 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"losses[{i}] must be finite and >= 0, got {loss[i]}")
        for row, value in zip(p.copy(), loss, strict=True):  # a copy: the caller may reuse its array
            key = row.tobytes()
            self._points.pop(key, None)
            self._points[key] = (row, float(value))
        while len(self._points) > self.history:
            del self._points[next(iter(self._points))]

    def fraction(self) -> float:
        """The bred fraction for the next draw (0 until a loss has been observed)."""
        if not self._points:
            return 0.0
        progress = min(self._drawn / self.breakpoint, 1.0)
        return self.start + (self.end - self.start) * progress

    def draw(self, n: int) -> np.ndarray:
        """The next ``n`` parameter sets ``[n, P]``, all inside the box."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        dim = self.space.dim
        f = self.fraction()  # one fraction for the whole draw, so a draw's bred count is known up front
        if self._points:
            self._drawn += n
        if self.use_true_mixing:
            bred = np.zeros(n, dtype=bool)
            bred[self._rng.permutation(n)[: round(f * n)]] = True
        else:
            bred = self._rng.random(n) < f
        unit = self._rng.random((n, dim))  # [n, P]
        k = int(bred.sum())
        if k:
            unit[bred] = self._breed(k)
        # Children and uniform points lie in [0, 1); scale() can still round one just past ``high`` by an ulp.
        return np.minimum(self.space.scale(unit), self.space.high)

    def _breed(self, k: int) -> np.ndarray:
        """``k`` children in the unit cube ``[k, P]``: fitness-proportional parents, Gaussian mutation."""
        params = np.stack([row for row, _ in self._points.values()])  # [H, P]
        losses = np.array([loss for _, loss in self._points.values()])  # [H]
        # Scaling by the largest loss keeps the sum finite; with every loss 0 no point is harder than another.
        weights = losses / losses.max() if losses.max() > 0 else np.ones_like(losses)
        pick = self._rng.choice(len(losses), size=k, p=weights / weights.sum())
        parents = self.space.normalise(params[pick])  # [k, P]
        children = parents + self.sigma * self._rng.standard_normal(parents.shape)
        # Redraw rather than clip: clipping would pile children on the faces of the box.
        out = ~_in_unit_cube(children)
        for _ in range(self.max_retries):
            if not out.any():
                break
            children[out] = parents[out] + self.sigma * self._rng.standard_normal((int(out.sum()), parents.shape[1]))
            out = ~_in_unit_cube(children)
        children[out] = self._rng.random((int(out.sum()), parents.shape[1]))
        return children

    def state(self) -> dict[str, Any]:
        """Everything needed to continue the same sequence of draws (JSON-friendly)."""
        points = list(self._points.values())
        return {
            "seed": self.seed,
            "sigma": self.sigma,
            "start": self.start,
            "end": self.end,
            "breakpoint": self.breakpoint,
            "use_true_mixing": self.use_true_mixing,
            "max_retries": self.max_retries,
            "history": self.history,
            "drawn": self._drawn,
            "params": [row.tolist() for row, _ in points],
            "losses": [loss for _, loss in points],
            "rng": self._rng.bit_generator.state,
        }

    @classmethod
    def from_state(cls, space: ParamSpace, state: dict[str, Any]) -> BreedSampler:
        """Rebuild a sampler from ``state()``; its next draws are those the original would have made."""
        keys = ("seed", "sigma", "start", "end", "breakpoint", "use_true_mixing", "max_retries", "history")
        sampler = cls(space, **{k: state[k] for k in keys})
        losses = np.array(state["losses"], dtype=np.float64)
        sampler.observe(np.array(state["params"], dtype=np.float64).reshape(len(losses), space.dim), losses)
        sampler._drawn = int(state["drawn"])
        sampler._rng.bit_generator.state = state["rng"]
        return sampler


class UncertaintySampler:
    """Draws where the ensemble being trained disagrees most (active learning by query-by-committee).

    Of each draw of ``n``, ``round(fraction * n)`` points are picked from a pool of ``max(pool, 4 * k)``
    uniform candidates: the highest scores first (``scorer``: points ``[m, P]`` -> disagreement ``[m]``,
    the study's latest published ensemble), skipping a candidate closer than ``diversity`` (Euclidean, in
    the unit cube) to one already picked, so that one sharp peak of the score does not take the whole
    draw. The other points come from ``mix`` (uniform draws, or a ``BreedSampler``). Until a scorer is
    set (no ensemble published yet) every point comes from ``mix``.
    """

    adaptive = True
    kind = "uncertainty"

    def __init__(
        self,
        space: ParamSpace,
        seed: int = 0,
        fraction: float = 0.5,
        pool: int = 512,
        diversity: float = 0.05,
        mix: Any = None,
    ) -> None:
        if not (0.0 <= fraction <= 1.0):
            raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
        if isinstance(pool, bool) or not isinstance(pool, int | np.integer) or pool < 1:
            raise ValueError(f"pool must be an integer >= 1, got {pool!r}")
        if not (np.isfinite(diversity) and diversity >= 0):
            raise ValueError(f"diversity must be finite and >= 0, got {diversity}")
        self.space = space
        self.seed = seed
        self.uncertain_fraction = float(fraction)
        self.pool = int(pool)
        self.diversity = float(diversity)
        # The mix sampler gets its own stream (seed + 1) so that its draws do not depend on whether a
        # scorer was set: a mix of uniform draws is the uniform sampler of seed + 1 with points taken out.
        self.mix = mix if mix is not None else Sampler(space, "uniform", seed + 1)
        self._rng = np.random.default_rng(seed)
        self._scorer: Callable[[np.ndarray], np.ndarray] | None = None
        self.scored = 0  # points chosen by their score so far

    def set_scorer(self, scorer: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """The disagreement of the current ensemble at given points (``None``: none published yet)."""
        self._scorer = scorer

    def observe(self, params: np.ndarray, losses: np.ndarray) -> None:
        """Training losses per simulation, for a breed mix; uniform mixing ignores them."""
        self.mix.observe(params, losses)

    def fraction(self) -> float:
        """The bred fraction of a breed mix (what the study snapshot shows), 0 for uniform mixing."""
        return self.mix.fraction() if hasattr(self.mix, "fraction") else 0.0

    def draw(self, n: int) -> np.ndarray:
        """The next ``n`` parameter sets ``[n, P]``, all inside the box."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        scorer = self._scorer  # one scorer for the whole draw, whatever the study swaps in meanwhile
        k = round(self.uncertain_fraction * n) if scorer is not None and self.space.dim else 0
        picked = self._pick(k, scorer) if k else np.empty((0, self.space.dim))
        rest = self.mix.draw(n - len(picked))
        if not len(picked):  # no scorer yet: exactly the mix's draws
            return rest
        self.scored += len(picked)
        return np.concatenate([picked, rest])[self._rng.permutation(n)]  # (n, P), picked ones at random places

    def _pick(self, k: int, scorer: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """``k`` points among the pool's highest scores, at least ``diversity`` apart where the pool allows."""
        unit = self._rng.random((max(self.pool, 4 * k), self.space.dim))  # (m, P)
        cand = np.minimum(self.space.scale(unit), self.space.high)
        try:
            scores = np.asarray(scorer(cand), dtype=np.float64).reshape(-1)
        except Exception as e:  # a model that cannot score (being swapped, say): these points go to the mix
            log.warning("uncertainty scores failed (%s: %s); drawing from the mix instead", type(e).__name__, e)
            return np.empty((0, self.space.dim))
        if scores.shape != (len(cand),):
            raise ValueError(f"the scorer returned {list(scores.shape)} scores for {len(cand)} points")
        scores = np.where(np.isfinite(scores), scores, -np.inf)
        order = np.argsort(-scores, kind="stable")
        chosen: list[int] = []
        for i in order:
            if len(chosen) == k:
                break
            if chosen and np.min(np.linalg.norm(unit[chosen] - unit[i], axis=1)) < self.diversity:
                continue
            chosen.append(int(i))
        if len(chosen) < k:  # the pool is too crowded for the diversity asked: the best of the rest
            taken = set(chosen)
            rest = [int(i) for i in order if int(i) not in taken]
            chosen += rest[: k - len(chosen)]
        return cand[chosen]


def make_sampler(
    space: ParamSpace,
    kind: str,
    seed: int,
    breed: dict[str, Any] | None = None,
    uncertainty: dict[str, Any] | None = None,
    queries: dict[str, Any] | None = None,
    source: Callable[[], np.ndarray] | None = None,
) -> Any:
    """The sampler a study's config names: ``Sampler`` (uniform, sobol), ``BreedSampler`` (breed, with the
    settings ``breed``), ``UncertaintySampler`` (uncertainty, with ``uncertainty``; its ``mix`` names the
    sampler of the other points, a breed mix taking the settings ``breed``) or ``QuerySampler`` (queries,
    with ``queries``, drawing near the points ``source()`` gives)."""
    if kind == "queries":
        return QuerySampler(space, seed, source=source, **(queries or {}))
    if kind == "breed":
        return BreedSampler(space, seed, **(breed or {}))
    if kind == "uncertainty":
        u = dict(uncertainty or {})
        u.pop("refresh_s", None)  # the study's business: how often it loads a new scorer
        mix_kind = u.pop("mix", "uniform")
        mix = BreedSampler(space, seed + 1, **(breed or {})) if mix_kind == "breed" else None
        return UncertaintySampler(space, seed, mix=mix, **u)
    return Sampler(space, kind, seed)


def _in_unit_cube(unit: np.ndarray) -> np.ndarray:
    """Rows of ``unit [k, P]`` inside ``[0, 1)``, the support of the uniform draws."""
    return np.all((unit >= 0.0) & (unit < 1.0), axis=1)
