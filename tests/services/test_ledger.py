"""The simulation ledger's journal: a resumed study stands exactly where its dead driver stood."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.ledger import LedgerError, SimulationIds
from services.sampling import Sampler
from solvers.base import ParamSpace

SPACE = ParamSpace(("a", "b"), (0.0, -1.0), (1.0, 1.0))


def _ledger(kind: str, journal: Path | None = None, budget: int = 30) -> SimulationIds:
    return SimulationIds(Sampler(SPACE, kind, seed=7), 7, budget, 3, journal=journal)


def _replay(kind: str, journal: Path, budget: int = 30) -> SimulationIds:
    return SimulationIds.replay(journal, Sampler(SPACE, kind, seed=7), 7, budget, 3)


def _drive(s: SimulationIds, rng: np.random.Generator, rounds: int) -> list[int]:
    """Random hand-outs and outcomes, as actors and external clients would make them; returns ids out."""
    out: list[int] = []
    for _ in range(rounds):
        got = s.take(int(rng.integers(1, 5)), "actors" if rng.random() < 0.7 else "external")
        if got is not None:
            out.extend(got.ids.tolist())
        if out and rng.random() < 0.8:
            k = int(rng.integers(1, len(out) + 1))
            ended, out = out[:k], out[k:]
            outcome = str(rng.choice(["done", "done", "done", "failed", "interrupted"]))
            s.settle(ended, outcome, requeue=bool(rng.random() < 0.7))
    return out


@pytest.mark.parametrize("kind", ["uniform", "sobol"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replayed_journal_stands_where_the_driver_stood(tmp_path: Path, kind: str, seed: int) -> None:
    journal = tmp_path / "ledger.jsonl"
    live = _ledger(kind, journal)
    running = _drive(live, np.random.default_rng(seed), 25)
    live.close()  # the driver dies here: `running` were out
    again = _replay(kind, journal)
    # What the dead driver's ledger would do had its running simulations been interrupted, ...
    live.settle(running, "interrupted")
    assert again.handed_out == live.handed_out and again.budget == live.budget
    assert again.done == live.done and again.counts == live.counts and again.abandoned == live.abandoned
    assert again.outstanding() == 0
    # ... and both go on alike: the same ids, parameters, seeds and attempts, to the end of the budget.
    while True:
        a, b = live.take(3, "actors"), again.take(3, "actors")
        if a is None or b is None:
            assert a is None and b is None
            break
        for x, y in ((a.ids, b.ids), (a.params, b.params), (a.seeds, b.seeds), (a.attempts, b.attempts)):
            np.testing.assert_array_equal(x, y)
        live.settle(a.ids, "done")
        again.settle(b.ids, "done")
    # No simulation completed twice, over both drivers' lives.
    assert len(again.done) == len(set(again.done))


def test_resume_reruns_what_was_running_without_counting_an_attempt_and_nothing_done(tmp_path: Path) -> None:
    journal = tmp_path / "ledger.jsonl"
    s = _ledger("uniform", journal, budget=6)
    s.settle(s.take(3, "actors").ids, "done")
    running = s.take(2, "actors")
    assert running.attempts.tolist() == [1, 1]
    s.close()
    r = _replay("uniform", journal, budget=6)
    seen = []
    while (got := r.take(6, "actors")) is not None:
        seen.extend(got.ids.tolist())
        if got.ids[0] in running.ids:
            assert got.attempts.tolist() == [1]  # the attempt the kill cut short is not counted
        r.settle(got.ids, "done")
    assert sorted(seen) == [3, 4, 5] and sorted(r.done) == list(range(6))
    # The resumed driver's journal goes on in the same file: a second resume sees both lives.
    r.close()
    twice = _replay("uniform", journal, budget=6)
    assert sorted(twice.done) == list(range(6)) and twice.exhausted


def test_a_last_line_cut_short_is_ignored_and_a_damaged_one_refused(tmp_path: Path) -> None:
    journal = tmp_path / "ledger.jsonl"
    s = _ledger("uniform", journal)
    s.settle(s.take(2, "actors").ids, "done")
    s.close()
    with journal.open("a") as f:
        f.write('{"settle":[2')  # the kill landed mid-write
    r = _replay("uniform", journal)
    assert r.done == [0, 1]
    r.settle(r.take(1, "actors").ids, "done")  # the resumed driver writes on
    r.close()
    assert _replay("uniform", journal).done == [0, 1, 2]
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(LedgerError, match="line 2"):
        _replay("uniform", journal)
    with pytest.raises(LedgerError, match="cannot read"):
        _replay("uniform", tmp_path / "missing.jsonl")


def test_an_adaptive_samplers_points_are_journalled_and_replayed_not_redrawn(tmp_path: Path) -> None:
    """Breed's draws depend on losses that a replay never sees again: the journal keeps the points drawn,
    and the resumed ledger hands out exactly those, and then goes on drawing inside the box."""
    from services.sampling import BreedSampler

    journal = tmp_path / "ledger.jsonl"
    live = SimulationIds(BreedSampler(SPACE, seed=3, start=0.5, end=0.5), 3, 40, 3, journal=journal)
    first = live.take(8, "actors")
    assert first is not None
    # Losses for the first points steer the next draws (bred near the worst one).
    losses = np.zeros(8)
    losses[2] = 1.0
    assert live.observe(first.ids, losses) == 8
    second = live.take(8, "actors")
    assert second is not None
    live.settle(first.ids, "done")
    live.close()  # the driver dies with `second` out
    again = SimulationIds.replay(journal, BreedSampler(SPACE, seed=3, start=0.5, end=0.5), 3, 40, 3)
    retried = [again.take(1, "actors") for _ in range(8)]
    assert sorted(int(r.ids[0]) for r in retried) == second.ids.tolist()
    by_id = {int(r.ids[0]): r.params[0] for r in retried}
    np.testing.assert_array_equal(np.stack([by_id[i] for i in second.ids.tolist()]), second.params)
    more = again.take(8, "actors")
    assert more is not None and more.ids.tolist() == list(range(16, 24))
    assert np.all((more.params >= SPACE.low) & (more.params <= SPACE.high))


def test_observed_losses_reach_the_sampler_by_point_and_bad_ones_are_dropped() -> None:
    seen: list[tuple[np.ndarray, np.ndarray]] = []

    class Recording(Sampler):
        adaptive = True

        def observe(self, params: np.ndarray, losses: np.ndarray) -> None:
            seen.append((params.copy(), losses.copy()))

    s = SimulationIds(Recording(SPACE, "uniform", seed=1), 1, 10, 3)
    got = s.take(4, "actors")
    assert got is not None
    s.settle(got.ids[:2], "done")  # settled ids keep their points: losses arrive after a simulation ends
    n = s.observe(np.array([3, 0, 99, 1, 2]), np.array([0.3, 0.1, 5.0, np.nan, -1.0]))
    assert n == 2  # 99 never handed out, a NaN and a negative loss dropped
    ((params, losses),) = seen
    np.testing.assert_array_equal(params, got.params[[3, 0]])
    np.testing.assert_array_equal(losses, [0.3, 0.1])
    # A sampler whose draws ignore losses is never sent any.
    plain = _ledger("uniform")
    plain.take(2, "actors")
    assert plain.observe(np.array([0, 1]), np.array([1.0, 2.0])) == 0


def test_an_added_simulation_takes_the_next_id_on_top_of_the_budget_and_is_replayed(tmp_path: Path) -> None:
    journal = tmp_path / "ledger.jsonl"
    s = _ledger("uniform", journal, budget=4)
    first = s.take(2, "actors")
    assert first is not None
    got = s.add(np.array([0.5, 0.25]), "fallback")
    assert got.ids.tolist() == [2] and got.params.tolist() == [[0.5, 0.25]] and s.budget == 5
    assert s.is_out(2) and s.outstanding("fallback") == 1
    with pytest.raises(ValueError, match="must lie in"):
        s.add(np.array([2.0, 0.0]), "fallback")  # outside the study's box: nothing handed out
    rest = s.take(10, "actors")
    assert rest is not None and rest.ids.tolist() == [3, 4]  # the budget's own simulations are all still run
    # The uniform draws of the budget's simulations are those a ledger without the addition makes.
    plain = _ledger("uniform", budget=4)
    drawn = np.concatenate([plain.take(2, "actors").params, plain.take(10, "actors").params])
    np.testing.assert_array_equal(np.concatenate([first.params, rest.params]), drawn)
    s.settle([2], "done")
    s.close()
    again = _replay("uniform", journal, budget=4)
    assert again.budget == 5 and again.done == [2] and again.handed_out == 5
    assert sorted(again._out) == [] and again.outstanding() == 0
    # What was running when the journal ends is handed out again, with its parameters.
    rerun = []
    while (nxt := again.take(10, "actors")) is not None:
        rerun += nxt.ids.tolist()
    assert sorted(rerun) == [0, 1, 3, 4]
