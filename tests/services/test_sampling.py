"""The loss-driven breed sampler: who gets bred, how much, and that every point stays in the box."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from services.sampling import BreedSampler, Sampler, UncertaintySampler, make_sampler
from solvers.base import ParamSpace

SPACE = ParamSpace(("a", "b", "c"), (0.0, -1.0, 10.0), (1.0, 1.0, 20.0))
# Three well separated parents, in the box's own units.
PARENTS = SPACE.scale(np.array([[0.2, 0.2, 0.2], [0.5, 0.8, 0.5], [0.8, 0.4, 0.9]]))


def _nearest(space: ParamSpace, points: np.ndarray, parents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each point's nearest parent and the distance to it, both in the unit cube."""
    d = np.linalg.norm(space.normalise(points)[:, None, :] - space.normalise(parents)[None, :, :], axis=-1)  # [N, K]
    return d.argmin(axis=1), d.min(axis=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sigma": 0.0}, "sigma must be"),
        ({"sigma": float("nan")}, "sigma must be"),
        ({"start": -0.1}, "start and end"),
        ({"start": 0.8, "end": 0.5}, "start and end"),
        ({"end": 1.5}, "start and end"),
        ({"breakpoint": 0}, "breakpoint must be"),
        ({"breakpoint": 2.5}, "breakpoint must be"),
        ({"max_retries": -1}, "max_retries must be"),
        ({"history": 0}, "history must be"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BreedSampler(SPACE, **kwargs)


@pytest.mark.parametrize(("bad", "index"), [(float("nan"), 1), (-0.5, 2), (float("inf"), 0)])
def test_bad_losses_are_refused_by_index(bad: float, index: int) -> None:
    losses = np.ones(3)
    losses[index] = bad
    sampler = BreedSampler(SPACE)
    with pytest.raises(ValueError, match=rf"losses\[{index}\] must be finite and >= 0"):
        sampler.observe(PARENTS, losses)
    assert sampler.fraction() == 0.0  # nothing half-recorded


def test_mismatched_or_out_of_box_observations_are_refused() -> None:
    sampler = BreedSampler(SPACE)
    with pytest.raises(ValueError, match=r"losses must have shape \[3\]"):
        sampler.observe(PARENTS, np.ones(2))
    with pytest.raises(ValueError, match="parameter 'c' must lie in"):
        sampler.observe(np.array([[0.5, 0.0, 25.0]]), np.ones(1))


def test_draws_are_uniform_before_any_loss() -> None:
    sampler = BreedSampler(SPACE, seed=3, start=0.5, end=1.0)
    assert sampler.fraction() == 0.0
    points = np.concatenate([sampler.draw(500) for _ in range(4)])  # [2000, 3]
    for j, (lo, hi) in enumerate(zip(SPACE.low, SPACE.high, strict=True)):
        assert stats.kstest(points[:, j], "uniform", args=(lo, hi - lo)).pvalue > 1e-3


def test_parents_are_chosen_in_proportion_to_their_loss() -> None:
    sampler = BreedSampler(SPACE, seed=1, sigma=1e-4, start=1.0, end=1.0)
    sampler.observe(PARENTS, np.array([1.0, 2.0, 7.0]))
    children = sampler.draw(4000)
    parent, dist = _nearest(SPACE, children, PARENTS)
    assert dist.max() < 1e-2  # every point was bred
    counts = np.bincount(parent, minlength=3)
    n = counts.sum()
    assert stats.chisquare(counts, n * np.array([0.1, 0.2, 0.7])).pvalue > 1e-3
    # The test has the power to tell: parents picked uniformly would be rejected.
    assert stats.chisquare(counts, np.full(3, n / 3)).pvalue < 1e-3


def test_the_latest_loss_counts_and_the_history_is_bounded() -> None:
    sampler = BreedSampler(SPACE, seed=2, sigma=1e-4, start=1.0, end=1.0, history=2)
    sampler.observe(PARENTS, np.array([5.0, 1.0, 1.0]))  # parent 0 falls out of a history of 2
    sampler.observe(PARENTS[1:2], np.array([0.0]))  # parent 1's newer loss replaces its older one
    parent, _ = _nearest(SPACE, sampler.draw(200), PARENTS)
    assert np.all(parent == 2)


def test_all_zero_losses_breed_from_every_parent() -> None:
    sampler = BreedSampler(SPACE, seed=4, sigma=1e-4, start=1.0, end=1.0)
    sampler.observe(PARENTS, np.zeros(3))
    parent, _ = _nearest(SPACE, sampler.draw(300), PARENTS)
    assert set(parent.tolist()) == {0, 1, 2}


def test_the_fraction_ramps_from_start_to_end_over_breakpoint_simulations() -> None:
    sampler = BreedSampler(SPACE, start=0.2, end=0.8, breakpoint=100)
    sampler.draw(70)  # draws before the first losses do not advance the ramp
    assert sampler.fraction() == 0.0
    sampler.observe(PARENTS, np.ones(3))
    assert sampler.fraction() == pytest.approx(0.2)
    sampler.draw(50)
    assert sampler.fraction() == pytest.approx(0.5)
    sampler.draw(50)
    assert sampler.fraction() == pytest.approx(0.8)
    sampler.draw(500)
    assert sampler.fraction() == pytest.approx(0.8)


def test_true_mixing_breeds_exactly_the_fraction_of_each_draw() -> None:
    parent = PARENTS[1:2]
    sampler = BreedSampler(SPACE, seed=5, sigma=1e-5, start=0.15, end=0.75, breakpoint=100, use_true_mixing=True)
    sampler.observe(parent, np.ones(1))
    seen = []
    for n in (37, 37, 37, 10, 1, 64, 37):
        expected = round(sampler.fraction() * n)
        _, dist = _nearest(SPACE, sampler.draw(n), parent)
        # A uniform point lands within 1e-3 of the parent with probability ~4e-9 in three dimensions.
        assert int((dist < 1e-3).sum()) == expected
        seen.append(expected)
    assert seen[0] < seen[2]  # the ramp moved


def test_without_true_mixing_each_point_is_bred_independently() -> None:
    parent = PARENTS[1:2]
    sampler = BreedSampler(SPACE, seed=6, sigma=1e-5, start=0.3, end=0.3)
    sampler.observe(parent, np.ones(1))
    counts = [int((_nearest(SPACE, sampler.draw(40), parent)[1] < 1e-3).sum()) for _ in range(100)]
    # Binomial(40, 0.3) per draw: the right mean, and not the same count every time.
    assert abs(np.mean(counts) - 12.0) < 4 * np.sqrt(40 * 0.3 * 0.7 / 100)
    assert len(set(counts)) > 3


def test_children_of_a_corner_parent_are_redrawn_not_clipped() -> None:
    space = ParamSpace(("a", "b"), (-2.0, 5.0), (3.0, 6.0))
    corner = np.array([space.low])
    sampler = BreedSampler(space, seed=7, sigma=0.5, start=1.0, end=1.0)
    sampler.observe(corner, np.ones(1))
    points = sampler.draw(5000)
    space.check(points)
    lo, hi = np.asarray(space.low), np.asarray(space.high)
    assert np.all((points > lo) & (points < hi))  # nothing lies on a face
    unit = space.normalise(points)
    # Clipping would put about half of the children on the two faces at the corner.
    assert np.mean(unit < 1e-3) < 0.01
    assert unit.mean() < 0.45  # still drawn towards the parent


def test_redrawn_children_follow_the_truncated_gaussian() -> None:
    space = ParamSpace(("a", "b"), (-2.0, 5.0), (3.0, 6.0))
    # Enough retries that the uniform fallback never fires: each coordinate is then N(0, 0.5) cut to [0, 1).
    sampler = BreedSampler(space, seed=8, sigma=0.5, start=1.0, end=1.0, max_retries=200)
    sampler.observe(np.array([space.low]), np.ones(1))
    unit = space.normalise(sampler.draw(3000))
    truncated = stats.truncnorm(a=0.0, b=2.0, loc=0.0, scale=0.5)
    for j in range(space.dim):
        assert stats.kstest(unit[:, j], truncated.cdf).pvalue > 1e-3


def _script(sampler: BreedSampler) -> list[np.ndarray]:
    out = [sampler.draw(20)]
    sampler.observe(PARENTS, np.array([3.0, 1.0, 0.5]))
    out += [sampler.draw(30), sampler.draw(7)]
    sampler.observe(out[1][:5], np.arange(5.0))
    out.append(sampler.draw(40))
    return out


@pytest.mark.parametrize("use_true_mixing", [False, True])
def test_same_seed_same_points_another_seed_other_points(use_true_mixing: bool) -> None:
    kwargs = {"sigma": 0.05, "breakpoint": 20, "use_true_mixing": use_true_mixing}
    first = _script(BreedSampler(SPACE, seed=11, **kwargs))
    again = _script(BreedSampler(SPACE, seed=11, **kwargs))
    other = _script(BreedSampler(SPACE, seed=12, **kwargs))
    for a, b, c in zip(first, again, other, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


def test_a_restored_sampler_continues_the_same_sequence() -> None:
    sampler = BreedSampler(SPACE, seed=13, sigma=0.05, breakpoint=20)
    _script(sampler)
    restored = BreedSampler.from_state(SPACE, json.loads(json.dumps(sampler.state())))
    assert restored.fraction() == sampler.fraction()
    np.testing.assert_array_equal(restored.draw(50), sampler.draw(50))


def test_a_space_without_parameters_draws_empty_rows() -> None:
    space = ParamSpace((), (), ())
    sampler = BreedSampler(space, start=1.0, end=1.0)
    assert sampler.draw(4).shape == (4, 0)
    sampler.observe(np.empty((3, 0)), np.array([1.0, 2.0, 3.0]))
    assert sampler.fraction() == 1.0
    assert sampler.draw(5).shape == (5, 0)
    restored = BreedSampler.from_state(space, sampler.state())
    assert restored.draw(2).shape == (2, 0)


# The uncertainty sampler -------------------------------------------------------------------------------


def _peak(center: np.ndarray):
    """A scorer peaked at ``center`` (unit cube): the disagreement falls with the distance to it."""

    def score(points: np.ndarray) -> np.ndarray:
        return -np.linalg.norm(SPACE.normalise(points) - center, axis=1)

    return score


def test_uncertainty_draws_the_highest_scores_with_diversity_and_mixes_the_rest() -> None:
    center = np.array([0.9, 0.1, 0.5])
    s = UncertaintySampler(SPACE, seed=1, fraction=0.5, pool=2000, diversity=0.1)
    assert np.array_equal(s.draw(40), Sampler(SPACE, "uniform", 2).draw(40))  # no scorer yet: all mixed
    s.set_scorer(_peak(center))
    pts = s.draw(40)
    assert pts.shape == (40, 3) and np.all((pts >= SPACE.low) & (pts <= SPACE.high))
    dist = np.linalg.norm(SPACE.normalise(pts) - center, axis=1)
    near = dist < 0.3
    # 20 picked near the peak (uniform points land within 0.3 of it with probability ~0.1).
    assert 20 <= int(near.sum()) <= 27 and s.scored == 20
    # Every point picked: none closer than the diversity to another, unlike the crowd of the top scores.
    spread = UncertaintySampler(SPACE, seed=1, fraction=1.0, pool=2000, diversity=0.1)
    spread.set_scorer(_peak(center))
    picked = SPACE.normalise(spread.draw(20))
    gaps = np.linalg.norm(picked[:, None] - picked[None], axis=2) + np.eye(20)
    assert gaps.min() >= 0.1
    tight = UncertaintySampler(SPACE, seed=1, fraction=1.0, pool=2000, diversity=0.0)
    tight.set_scorer(_peak(center))
    crowd = np.linalg.norm(SPACE.normalise(tight.draw(20)) - center, axis=1)
    assert crowd.max() < np.linalg.norm(picked - center, axis=1).max()


def test_uncertainty_draws_are_reproducible_and_in_bounds() -> None:
    def run(seed: int) -> np.ndarray:
        s = UncertaintySampler(SPACE, seed=seed, fraction=0.7, pool=64)
        s.set_scorer(lambda p: p[:, 0] * p[:, 1])
        return np.concatenate([s.draw(n) for n in (5, 17, 0, 33)])

    a = run(4)
    assert a.shape == (55, 3) and np.all((a >= SPACE.low) & (a <= SPACE.high))
    assert np.array_equal(a, run(4)) and not np.array_equal(a, run(5))


def test_a_failing_scorer_falls_back_to_the_mix_and_a_wrong_one_is_refused() -> None:
    s = UncertaintySampler(SPACE, seed=0, fraction=1.0, pool=16)

    def broken(p: np.ndarray) -> np.ndarray:
        raise RuntimeError("model swapped")

    s.set_scorer(broken)
    assert s.draw(8).shape == (8, 3) and s.scored == 0
    s.set_scorer(lambda p: np.zeros(3))
    with pytest.raises(ValueError, match=r"returned \[3\] scores for 32 points"):
        s.draw(8)
    # Non-finite scores rank last, never first.
    s.set_scorer(lambda p: np.where(p[:, 0] > 0.5, np.nan, p[:, 0]))
    assert np.all(s.draw(4)[:, 0] <= 0.5)


def test_an_uncertainty_sampler_mixing_with_breed_passes_it_the_losses() -> None:
    s = make_sampler(
        SPACE,
        "uncertainty",
        3,
        {"sigma": 0.01, "start": 1.0, "end": 1.0},
        {"fraction": 0.25, "mix": "breed", "refresh_s": 5},
    )
    assert isinstance(s, UncertaintySampler) and isinstance(s.mix, BreedSampler) and s.adaptive
    assert s.fraction() == 0.0
    s.observe(PARENTS[:1], np.array([1.0]))
    assert s.fraction() == 1.0  # the breed mix now breeds every point it draws
    s.set_scorer(lambda p: p[:, 0])
    pts = SPACE.normalise(s.draw(8))
    near_parent = np.abs(pts - SPACE.normalise(PARENTS[:1])).max(axis=1) < 0.06
    assert int(near_parent.sum()) == 6  # 2 scored, 6 bred


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": 1.5}, "fraction must lie in"),
        ({"pool": 0}, "pool must be an integer"),
        ({"diversity": -1.0}, "diversity must be finite"),
    ],
)
def test_bad_uncertainty_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UncertaintySampler(SPACE, **kwargs)
