"""Query points: the bounded reservoir, the gateway's book of them in the store, and the sampler that revisits them."""

from __future__ import annotations

import json
import logging
import stat
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from services import queries
from services.queries import QueryBook, QueryReservoir, QuerySampler, query_source, read_queries
from solvers.base import ParamSpace

SPACE = ParamSpace(("a", "b", "c"), (0.0, -1.0, 10.0), (1.0, 1.0, 20.0))
NAMES = list(SPACE.names)


def _labelled(label: float, n: int, start: int = 0) -> np.ndarray:
    """``[n, 3]`` rows ``(label, i, 2 i)``: the side a row came from, a unique id, and a check on torn rows."""
    i = np.arange(start, start + n, dtype=np.float64)
    return np.stack([np.full(n, label), i, 2 * i], axis=1)


def _store(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).mkdir()
    return tmp_path


# The reservoir -----------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 1_000_001, 2.5, True])
def test_reservoir_refuses_bad_capacity(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity must be an integer"):
        QueryReservoir(capacity)  # type: ignore[arg-type]


@pytest.mark.parametrize("batch", [100_000, 7, 1])
def test_reservoir_is_bounded(batch: int) -> None:
    r = QueryReservoir(64, seed=3)
    offered = _labelled(0.0, 100_000 if batch > 1 else 5_000)
    for i in range(0, len(offered), batch):
        r.offer(offered[i : i + batch])
    pts = r.points()
    assert pts.shape == (64, 3) and len(r) == 64
    assert r.seen == len(offered)
    assert r._buf is not None and len(r._buf) <= 64  # memory, not just the view, is capped
    np.testing.assert_array_equal(pts, offered[pts[:, 1].astype(int)])  # every kept row is one offered, whole
    assert len(np.unique(pts[:, 1])) == 64  # each offered point is kept at most once
    assert pts[:, 1].max() >= 64  # later points did replace the first ones


def test_reservoir_refuses_mixed_dimensions_until_cleared() -> None:
    r = QueryReservoir(4)
    assert r.points().shape == (0, 0) and r.dim is None
    r.offer(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"points must have shape \[n, 3\]"):
        r.offer(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"points must have shape \[n, P\]"):
        r.offer(np.zeros(3))
    r.clear()
    assert (len(r), r.seen, r.dim) == (0, 0, None)
    r.offer(np.ones((1, 2)))
    np.testing.assert_array_equal(r.points(), np.ones((1, 2)))


@pytest.mark.parametrize("one_by_one", [True, False])
def test_algorithm_r_keeps_each_point_with_equal_probability_small(one_by_one: bool) -> None:
    # 5 points, capacity 2: each kept with probability 2/5. Off-by-one replacement odds, or the first
    # rather than the last of two points hitting one slot in a batch winning, move these by > 0.05.
    n, cap, trials = 5, 2, 20_000
    counts = np.zeros(n)
    values = np.arange(n, dtype=np.float64)[:, None]
    for seed in range(trials):
        r = QueryReservoir(cap, seed=seed)
        if one_by_one:
            for v in values:
                r.offer(v[None])
        else:
            r.offer(values)
        counts[r.points()[:, 0].astype(int)] += 1
    # Binomial sd of each frequency is sqrt(0.4 * 0.6 / 20000) = 0.0035: 0.02 is over 5 sd.
    np.testing.assert_allclose(counts / trials, cap / n, atol=0.02)


def test_algorithm_r_is_uniform_over_many_points_in_random_batches() -> None:
    n, cap, trials = 200, 20, 3000
    counts = np.zeros(n)
    split = np.random.default_rng(12345)
    values = np.arange(n, dtype=np.float64)[:, None]
    for seed in range(trials):
        r = QueryReservoir(cap, seed=seed)
        cuts = np.sort(split.choice(np.arange(1, n), size=8, replace=False))
        for part in np.split(values, cuts):
            r.offer(part)
        assert len(r) == cap
        counts[r.points()[:, 0].astype(int)] += 1
    # Fixed seeds, so this cannot flake; the chi-square is conservative here (the counts sum to a constant).
    assert stats.chisquare(counts).pvalue > 1e-3
    early, late = counts[:cap].mean(), counts[-cap:].mean()
    assert abs(early - late) / (trials * cap / n) < 0.1  # no drift from first to last points offered


def test_merge_takes_slots_in_proportion_to_seen() -> None:
    fractions = []
    for seed in range(200):
        a = QueryReservoir(100, seed=seed)
        a.offer(_labelled(0.0, 3000))
        b = QueryReservoir(100, seed=10_000 + seed)
        b.offer(_labelled(1.0, 1000))
        a.merge(b.points(), b.seen)
        pts = a.points()
        assert pts.shape == (100, 3) and a.seen == 4000
        assert len({tuple(row) for row in pts}) == 100  # without replacement from each side
        fractions.append(np.mean(pts[:, 0] == 0.0))
    # Hypergeometric mean 3/4; the sd of the mean over 200 merges is about 0.003.
    assert abs(np.mean(fractions) - 0.75) < 0.015


def test_merge_of_small_samples_keeps_everything() -> None:
    a = QueryReservoir(10)
    a.offer(_labelled(0.0, 3))
    a.merge(_labelled(1.0, 4), 4)
    pts = a.points()
    assert a.seen == 7 and len(pts) == 7
    assert sorted(map(tuple, pts)) == sorted(map(tuple, np.concatenate([_labelled(0.0, 3), _labelled(1.0, 4)])))
    a.merge(np.empty((0, 0)), 0)  # an empty side changes nothing
    assert a.seen == 7 and len(a) == 7


def test_merge_refuses_inconsistent_sides() -> None:
    a = QueryReservoir(10)
    a.offer(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="other_seen must be an integer >= 4"):
        a.merge(np.ones((4, 3)), 3)
    with pytest.raises(ValueError, match=r"other_points must have shape \[n, 3\]"):
        a.merge(np.ones((4, 2)), 4)
    assert a.seen == 2 and len(a) == 2


def test_merge_with_a_short_side_takes_all_it_has() -> None:
    # The other side saw 1000 points but kept only 5 (a smaller capacity elsewhere): all 5 are taken.
    a = QueryReservoir(50, seed=1)
    a.offer(_labelled(0.0, 100))
    a.merge(_labelled(1.0, 5), 1000)
    pts = a.points()
    assert len(pts) == 50 and a.seen == 1100
    assert np.sum(pts[:, 0] == 1.0) == 5


# The book ----------------------------------------------------------------------------------------


def test_book_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="capacity must be"):
        QueryBook(tmp_path, capacity=0)
    with pytest.raises(ValueError, match="flush_s must be"):
        QueryBook(tmp_path, flush_s=-1.0)
    with pytest.raises(ValueError, match="max_names must be"):
        QueryBook(tmp_path, max_names=0)


def test_two_replicas_end_with_one_bounded_merged_file(tmp_path: Path) -> None:
    root = _store(tmp_path, "m")
    one = QueryBook(root, capacity=50, seed=1)
    two = QueryBook(root, capacity=50, seed=2)
    one.record("m", _labelled(0.0, 300), names=NAMES)
    two.record("m", _labelled(1.0, 100), names=NAMES)
    assert one.flush() == 1 and two.flush() == 1
    pts, names, seen = read_queries(root, "m")
    assert names == NAMES and seen == 400 and pts.shape == (50, 3)
    assert set(pts[:, 0]) == {0.0, 1.0}  # both replicas' queries are in it
    for label, n in ((0.0, 300), (1.0, 100)):
        mine = pts[pts[:, 0] == label]
        np.testing.assert_array_equal(mine, _labelled(label, n)[mine[:, 1].astype(int)])
    assert stat.S_IMODE((root / "m" / queries.QUERIES).stat().st_mode) == 0o644
    # Nothing new: nothing written. More queries later: the count goes on.
    assert one.flush() == 0
    one.record("m", _labelled(0.0, 10, start=300), names=NAMES)
    one.flush()
    assert read_queries(root, "m")[2] == 410
    assert not list((root / "m").glob(".*.tmp"))


def test_replicas_merge_in_proportion_to_their_queries(tmp_path: Path) -> None:
    fractions = []
    for run in range(40):
        (tmp_path / str(run)).mkdir()
        root = _store(tmp_path / str(run), "m")
        one = QueryBook(root, capacity=40, seed=2 * run)
        two = QueryBook(root, capacity=40, seed=2 * run + 1)
        one.record("m", _labelled(0.0, 300), names=NAMES)
        two.record("m", _labelled(1.0, 100), names=NAMES)
        (one if run % 2 else two).flush()  # the order of the flushes does not matter
        (two if run % 2 else one).flush()
        fractions.append(np.mean(read_queries(root, "m")[0][:, 0] == 0.0))
    assert abs(np.mean(fractions) - 0.75) < 0.05  # sd of the mean about 0.01


def test_record_drops_bad_names_shapes_and_rows(tmp_path: Path) -> None:
    book = QueryBook(_store(tmp_path, "m"))
    book.record("../evil", np.zeros((2, 3)))
    book.record("", np.zeros((2, 3)))
    book.record("m", np.zeros(3))  # not [n, P]
    book.record("m", np.zeros((2, 3)), names=["a", "b"])  # names of the wrong length
    book.record("m", [["x", "y"]])  # type: ignore[arg-type]
    assert book.names() == []
    rows = np.array([[0.1, 0.2, 11.0], [np.nan, 0.0, 12.0], [0.3, np.inf, 13.0], [0.4, 0.5, 14.0]])
    book.record("m", rows, names=NAMES)
    pts, seen = book.pending("m")
    assert seen == 2
    np.testing.assert_array_equal(np.sort(pts, axis=0), rows[[0, 3]])


def test_concurrent_records_stay_bounded_and_consistent(tmp_path: Path) -> None:
    root = _store(tmp_path, "m")
    book = QueryBook(root, capacity=64, seed=5)
    threads_n, batches, rows = 8, 300, 3
    stop = threading.Event()

    def writer(t: int) -> None:
        for b in range(batches):
            book.record("m", _labelled(float(t), rows, start=b * rows), names=NAMES)

    def flusher() -> None:
        while not stop.is_set():
            book.flush()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the threads as much as the interpreter allows
    try:
        workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
        f = threading.Thread(target=flusher)
        f.start()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        stop.set()
        f.join()
    finally:
        sys.setswitchinterval(old)
    book.flush()
    pts, _, seen = read_queries(root, "m")
    assert seen == threads_n * batches * rows  # no query counted twice or lost between record and flush
    assert pts.shape == (64, 3)
    np.testing.assert_array_equal(pts[:, 2], 2 * pts[:, 1])  # no torn rows
    assert set(pts[:, 0]) <= set(range(threads_n))
    assert book.names() == []


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        b"\xff\xfe\x00binary",
        json.dumps({"format": "something-else", "names": NAMES, "seen": 3, "points": []}),
        json.dumps({"format": "surge-queries", "names": NAMES, "seen": 1, "points": [[1, 2, 3], [4, 5, 6]]}),
        json.dumps({"format": "surge-queries", "names": NAMES, "seen": 5, "points": [[1, 2]]}),
        json.dumps({"format": "surge-queries", "names": NAMES, "seen": "many", "points": []}),
        json.dumps([1, 2, 3]),
    ],
)
def test_a_corrupt_or_foreign_file_is_replaced_with_a_warning(
    tmp_path: Path, content: str | bytes, caplog: pytest.LogCaptureFixture
) -> None:
    root = _store(tmp_path, "m")
    path = root / "m" / queries.QUERIES
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert read_queries(root, "m")[2] == 0  # a study sees no points rather than an error
    book = QueryBook(root, capacity=8)
    book.record("m", _labelled(0.0, 5), names=NAMES)
    with caplog.at_level(logging.WARNING, logger="surge.queries"):
        assert book.flush() == 1
    assert any("replacing" in r.getMessage() for r in caplog.records)
    pts, names, seen = read_queries(root, "m")
    assert (seen, names, pts.shape) == (5, NAMES, (5, 3))


def test_a_failed_write_keeps_the_points_for_the_next_flush(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _store(tmp_path, "m")
    blocker = root / "m" / queries.QUERIES
    blocker.mkdir()  # os.replace cannot put a file over a directory
    book = QueryBook(root, capacity=8)
    book.record("m", _labelled(0.0, 5), names=NAMES)
    with caplog.at_level(logging.WARNING, logger="surge.queries"):
        assert book.flush() == 0
    assert any("cannot write the queries of 'm'" in r.getMessage() for r in caplog.records)
    book.record("m", _labelled(0.0, 3, start=5), names=NAMES)
    assert book.pending("m")[1] == 8
    blocker.rmdir()
    assert book.flush() == 1
    pts, _, seen = read_queries(root, "m")
    assert seen == 8 and sorted(pts[:, 1]) == list(range(8))


def test_the_names_held_are_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _store(tmp_path, *(f"m{i}" for i in range(6)))
    book = QueryBook(root, max_names=3)
    with caplog.at_level(logging.WARNING, logger="surge.queries"):
        for i in range(6):
            book.record(f"m{i}", np.zeros((1, 3)))
        book.record("m5", np.zeros((1, 3)))
    assert book.names() == ["m0", "m1", "m2"]
    assert sum("ignoring queries of new ones" in r.getMessage() for r in caplog.records) == 1
    book.record("m0", np.ones((1, 3)))  # names already held still take points
    assert book.pending("m0")[1] == 2
    assert book.flush() == 3
    assert [read_queries(root, f"m{i}")[2] for i in range(6)] == [2, 1, 1, 0, 0, 0]
    book.record("m4", np.zeros((1, 3)))  # a flush frees the names it wrote
    assert book.names() == ["m4"]


def test_queries_of_other_parameters_replace_the_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _store(tmp_path, "m")
    first = QueryBook(root, seed=1)
    first.record("m", _labelled(0.0, 20), names=NAMES)
    first.flush()
    same = QueryBook(root, seed=2)
    same.record("m", _labelled(1.0, 5), names=NAMES)
    same.flush()
    assert read_queries(root, "m")[2] == 25  # same parameters: merged
    # Retrained elsewhere on a box of the same dimension but other parameters: replaced, not merged.
    other = QueryBook(root, seed=3)
    other.record("m", np.full((4, 3), 0.5), names=["a", "b", "z"])
    with caplog.at_level(logging.INFO, logger="surge.queries"):
        other.flush()
    pts, names, seen = read_queries(root, "m")
    assert (names, seen) == (["a", "b", "z"], 4)
    np.testing.assert_array_equal(pts, np.full((4, 3), 0.5))
    assert any("other parameters" in r.getMessage() for r in caplog.records)
    fewer = QueryBook(root, seed=4)  # and of another dimension
    fewer.record("m", np.full((2, 2), 0.25), names=["a", "d"])
    fewer.flush()
    pts, names, seen = read_queries(root, "m")
    assert (names, seen, pts.shape) == (["a", "d"], 2, (2, 2))


def test_a_model_with_new_inputs_drops_its_unflushed_queries(tmp_path: Path) -> None:
    book = QueryBook(_store(tmp_path, "m"))
    book.record("m", np.zeros((3, 3)), names=NAMES)
    book.record("m", np.ones((2, 2)), names=["x", "y"])
    pts, seen = book.pending("m")
    assert seen == 2
    np.testing.assert_array_equal(pts, np.ones((2, 2)))


def test_a_deleted_model_is_not_recreated(tmp_path: Path) -> None:
    book = QueryBook(tmp_path)
    book.record("gone", np.zeros((1, 3)))
    assert book.flush() == 0
    assert not (tmp_path / "gone").exists()


def test_maybe_flush_waits_for_flush_s(tmp_path: Path) -> None:
    root = _store(tmp_path, "m")
    slow = QueryBook(root, flush_s=3600.0)
    slow.record("m", np.zeros((1, 3)))
    assert slow.maybe_flush() == 0 and not (root / "m" / queries.QUERIES).exists()
    eager = QueryBook(root, flush_s=0.0)
    eager.record("m", np.zeros((1, 3)))
    assert eager.maybe_flush() == 1 and read_queries(root, "m")[2] == 1


@pytest.mark.parametrize("name", ["absent", "../etc", "a/b", ""])
def test_read_queries_of_a_missing_or_bad_name_is_empty(tmp_path: Path, name: str) -> None:
    pts, names, seen = read_queries(tmp_path, name)
    assert pts.shape == (0, 0) and names == [] and seen == 0


def test_query_source_checks_the_parameter_names(tmp_path: Path) -> None:
    root = _store(tmp_path, "m")
    book = QueryBook(root)
    book.record("m", SPACE.scale(np.full((2, 3), 0.5)), names=NAMES)
    book.flush()
    np.testing.assert_array_equal(query_source(root, "m", SPACE)(), SPACE.scale(np.full((2, 3), 0.5)))
    other = ParamSpace(("a", "b", "z"), SPACE.low, SPACE.high)
    assert query_source(root, "m", other)().shape == (0, 3)
    assert query_source(root, "absent", SPACE)().shape == (0, 3)


# The sampler -------------------------------------------------------------------------------------

QUERY_POINTS = SPACE.scale(np.array([[0.3, 0.3, 0.3], [0.7, 0.6, 0.2]]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fraction": -0.1}, "fraction must lie in"),
        ({"fraction": 1.5}, "fraction must lie in"),
        ({"fraction": float("nan")}, "fraction must lie in"),
        ({"jitter": -0.01}, "jitter must be"),
        ({"jitter": float("inf")}, "jitter must be"),
        ({"refresh_s": -1}, "refresh_s must be"),
        ({"source": 3}, "source must be callable"),
    ],
)
def test_sampler_refuses_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuerySampler(SPACE, **kwargs)


def test_sampler_interface() -> None:
    s = QuerySampler(SPACE)
    assert (s.adaptive, s.kind) == (True, "queries")
    s.observe(QUERY_POINTS, np.array([0.1, 0.0]))  # accepted and ignored
    with pytest.raises(ValueError, match=r"losses\[1\] must be finite and >= 0"):
        s.observe(QUERY_POINTS, np.array([0.1, -1.0]))
    with pytest.raises(ValueError, match="parameter 'c' must lie in"):
        s.observe(np.array([[0.5, 0.0, 25.0]]), np.ones(1))
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        s.draw(-1)
    with pytest.raises(ValueError, match=r"points must have shape \[m, 3\]"):
        s.set_points(np.zeros((2, 2)))


def test_every_draw_lies_in_the_box() -> None:
    corners = np.array([SPACE.low, SPACE.high, [0.0, 1.0, 10.0]])
    s = QuerySampler(SPACE, seed=1, fraction=0.8, jitter=0.2)
    s.set_points(corners)
    x = s.draw(5000)
    assert x.shape == (5000, 3) and x.dtype == np.float64
    SPACE.check(x)  # raises if any point left the box
    assert s.queried == 4000


@pytest.mark.parametrize(("fraction", "n"), [(0.5, 10), (0.3, 7), (0.25, 2), (1.0, 5), (0.0, 6), (0.5, 0)])
def test_exactly_round_fraction_n_points_repeat_queries(fraction: float, n: int) -> None:
    s = QuerySampler(SPACE, seed=2, fraction=fraction, jitter=0.0)
    s.set_points(QUERY_POINTS)
    assert s.queried_fraction() == fraction
    for _ in range(5):
        x = s.draw(n)
        exact = (x[:, None, :] == QUERY_POINTS[None, :, :]).all(axis=2).any(axis=1)  # [n]
        assert exact.sum() == round(fraction * n)
    assert s.queried == 5 * round(fraction * n)


def test_query_draws_land_at_random_positions() -> None:
    s = QuerySampler(SPACE, seed=3, fraction=0.5, jitter=0.0)
    s.set_points(QUERY_POINTS)
    positions = set()
    for _ in range(20):
        x = s.draw(8)
        positions.add(tuple(np.flatnonzero((x[:, None, :] == QUERY_POINTS[None]).all(axis=2).any(axis=1))))
    assert len(positions) > 10


def test_jitter_is_relative_to_each_parameter_range() -> None:
    s = QuerySampler(SPACE, seed=4, fraction=1.0, jitter=0.01)
    s.set_points(QUERY_POINTS[:1])
    x = s.draw(4000)
    dev = SPACE.normalise(x) - SPACE.normalise(QUERY_POINTS[:1])  # [n, P], unit cube
    np.testing.assert_allclose(dev.std(axis=0), 0.01, rtol=0.1)
    np.testing.assert_allclose(dev.mean(axis=0), 0.0, atol=0.001)
    assert not (dev == 0).all(axis=1).any()  # nothing left unjittered this far inside the box


def test_jitter_leaving_the_box_is_redrawn_then_dropped() -> None:
    # At a corner of the box a jittered point is inside with probability 1/8 per try: after the first
    # try and 10 redraws (7/8)^11 = 0.23 of them are left exactly on the query point; none is clipped.
    s = QuerySampler(SPACE, seed=12, fraction=1.0, jitter=0.05)
    for corner in (np.array([SPACE.high]), np.array([SPACE.low])):
        s.set_points(corner)
        x = s.draw(4000)
        exact = (x == corner).all(axis=1)
        assert abs(exact.mean() - (7 / 8) ** 11) < 0.03  # sd 0.007
        assert not (x[~exact] == corner).any()  # the rest lie strictly inside, not piled on the faces
        SPACE.check(x)


def test_reproducible_from_the_seed() -> None:
    def draws(seed: int) -> np.ndarray:
        s = QuerySampler(SPACE, seed=seed)
        s.set_points(QUERY_POINTS)
        return np.concatenate([s.draw(7), s.draw(13)])

    np.testing.assert_array_equal(draws(5), draws(5))
    assert not np.array_equal(draws(5), draws(6))


def test_no_query_points_means_uniform_draws() -> None:
    s = QuerySampler(SPACE, seed=7, source=lambda: np.empty((0, 3)))
    assert s.queried_fraction() == 0.0
    plain = QuerySampler(SPACE, seed=7)
    np.testing.assert_array_equal(s.draw(50), plain.draw(50))
    assert s.queried == 0
    fed = QuerySampler(SPACE, seed=7, source=lambda: QUERY_POINTS)
    assert not np.array_equal(fed.draw(50), QuerySampler(SPACE, seed=7).draw(50))


def test_the_source_is_polled_at_most_once_per_refresh_s(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(queries, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    feeds = [QUERY_POINTS[:1], QUERY_POINTS[1:]]
    calls = []

    def source() -> np.ndarray:
        calls.append(clock[0])
        return feeds[min(len(calls), 2) - 1]

    s = QuerySampler(SPACE, seed=8, source=source, fraction=1.0, jitter=0.0, refresh_s=10.0)
    for t in (100.0, 101.0, 109.9):
        clock[0] = t
        np.testing.assert_array_equal(s.draw(3), np.repeat(QUERY_POINTS[:1], 3, axis=0))
    assert calls == [100.0]
    clock[0] = 110.0
    np.testing.assert_array_equal(s.draw(3), np.repeat(QUERY_POINTS[1:], 3, axis=0))
    assert calls == [100.0, 110.0]


def test_a_failing_source_keeps_the_previous_points(caplog: pytest.LogCaptureFixture) -> None:
    results: list[object] = [QUERY_POINTS, OSError("stale file handle")]

    def source() -> np.ndarray:
        r = results.pop(0)
        if isinstance(r, Exception):
            raise r
        return r  # type: ignore[return-value]

    s = QuerySampler(SPACE, source=source, refresh_s=0.0)
    s.draw(1)
    with caplog.at_level(logging.WARNING, logger="surge.queries"):
        s.draw(1)
    np.testing.assert_array_equal(s.points, QUERY_POINTS)
    assert any("stale file handle" in r.getMessage() for r in caplog.records)


def test_points_outside_the_box_are_dropped() -> None:
    outside = np.array([[1.5, 0.0, 15.0], [0.5, -2.0, 15.0], [np.nan, 0.0, 15.0]])
    s = QuerySampler(SPACE, seed=9, fraction=1.0, jitter=0.0)
    s.set_points(np.concatenate([outside, QUERY_POINTS[:1]]))
    np.testing.assert_array_equal(s.points, QUERY_POINTS[:1])
    np.testing.assert_array_equal(s.draw(20), np.repeat(QUERY_POINTS[:1], 20, axis=0))
    s.set_points(outside)
    assert s.queried_fraction() == 0.0
    SPACE.check(s.draw(20))


def test_state_continues_the_same_draws() -> None:
    s = QuerySampler(SPACE, seed=10, fraction=0.4, jitter=0.05, refresh_s=3.0)
    s.set_points(QUERY_POINTS)
    s.draw(17)
    state = json.loads(json.dumps(s.state()))  # JSON-friendly
    resumed = QuerySampler.from_state(SPACE, state)
    assert (resumed.query_fraction, resumed.jitter, resumed.refresh_s, resumed.queried) == (0.4, 0.05, 3.0, 7)
    for n in (5, 11, 30):
        np.testing.assert_array_equal(resumed.draw(n), s.draw(n))
    fresh = QuerySampler(SPACE, seed=10, fraction=0.4, jitter=0.05)
    fresh.set_points(QUERY_POINTS)
    assert not np.array_equal(fresh.draw(5), QuerySampler.from_state(SPACE, state).draw(5))


def test_from_state_with_a_source_refreshes_at_the_first_draw() -> None:
    s = QuerySampler(SPACE, seed=11, fraction=1.0, jitter=0.0)
    s.set_points(QUERY_POINTS[:1])
    resumed = QuerySampler.from_state(SPACE, s.state(), source=lambda: QUERY_POINTS[1:])
    np.testing.assert_array_equal(resumed.draw(2), np.repeat(QUERY_POINTS[1:], 2, axis=0))


# The gateway keeps what it is asked, and a study's sampler draws there ---------------------------

HEAT = {"n": 8, "steps": 10, "dt": 0.01}
ASKED = {"u0": 310.0, "t_left": 210.0, "t_right": 390.0, "t_bottom": 120.0, "t_top": 480.0}


def _gateway(root: Path, **settings: object) -> object:
    import torch
    from fastapi.testclient import TestClient

    import solvers
    from services.gateway.app import create_app
    from services.gateway.settings import GatewaySettings
    from trainer.loop import LoopStats, Normaliser, make_card
    from trainer.models import build_model
    from trainer.problem import ProblemSpec
    from trainer.store import ModelStore

    spec = ProblemSpec.from_solver(solvers.get("heat2d", **HEAT), HEAT)
    torch.manual_seed(0)
    card = make_card(
        problem=spec.to_dict(),
        model_name="mlp",
        arch={"hidden": 8, "layers": 1},
        in_channels=spec.in_channels,
        out_channels=1,
        grid=spec.grid,
        norm=Normaliser(300.0, 100.0),
        stats=LoopStats(step=1, samples_seen=1, validation_error=0.5),
        study_id="s",
    )
    net = build_model("mlp", spec.in_channels, 1, spec.grid, hidden=8, layers=1)
    ModelStore(root).publish("heat", net, card)
    return TestClient(create_app(GatewaySettings(store=root, poll_interval_s=0.2, **settings), manager=None))


def test_the_gateway_keeps_the_points_it_is_asked_and_a_queries_study_draws_near_them(tmp_path: Path) -> None:
    from services.config import parse_config
    from services.sampling import make_sampler

    with _gateway(tmp_path, query_flush_s=3600) as c:  # flushed at shutdown, not by the timer
        for _ in range(3):  # one parameter set at several times counts once per request
            r = c.post("/v1/models/heat/predict", json={"params": ASKED, "times": [0.0, 0.02, 0.05]})
            assert r.status_code == 200, r.text
        bad = c.post("/v1/models/heat/predict", json={"params": {**ASKED, "u0": "hot"}, "times": [0.0]})
        assert bad.status_code == 422  # refused requests are not queries
    points, names, seen = read_queries(tmp_path, "heat")
    assert names == list(ASKED) and seen == 3
    assert np.array_equal(points, np.tile(list(ASKED.values()), (3, 1)))

    cfg = parse_config(
        {
            "model_name": "heat",
            "problem": {"solver": "heat2d", "config": HEAT},
            "sampler": {"kind": "queries", "queries": {"fraction": 0.5, "jitter": 0.0}},
        }
    )
    space = cfg.problem.spec().params
    sc = cfg.sampler
    sampler = make_sampler(
        space, sc.kind, sc.seed, queries=sc.queries_settings().model_dump(),
        source=query_source(tmp_path, cfg.served_name, space),
    )  # fmt: skip
    drawn = sampler.draw(40)
    near = np.all(drawn == list(ASKED.values()), axis=1)
    assert near.sum() == 20 and sampler.queried == 20  # half the draws where users asked, the rest uniform
    assert np.all((drawn >= space.low) & (drawn <= space.high))


def test_a_gateway_with_query_sample_0_keeps_nothing(tmp_path: Path) -> None:
    with _gateway(tmp_path, query_sample=0) as c:
        assert c.post("/v1/models/heat/predict", json={"params": ASKED, "times": [0.0]}).status_code == 200
    assert not (tmp_path / "heat" / queries.QUERIES).exists()
