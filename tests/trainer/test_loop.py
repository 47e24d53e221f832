"""The loop's pure functions: loss, schedule, steps, end of stream."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.loop import (
    LOSSES,
    PER_SAMPLE,
    LoopHooks,
    Moments,
    Normaliser,
    Schedule,
    SimulationLosses,
    evaluate,
    lr_at,
    rel_l2,
    run_loop,
)
from trainer.models import build_model


def test_rel_l2_exact_values() -> None:
    y = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    p = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    # sample 0: exact (0); sample 1: ||(-1, 0)|| / ||(1, 0)|| = 1
    assert float(rel_l2(p, y)) == pytest.approx(0.5)


def test_lr_schedule() -> None:
    assert lr_at(0, 1.0, 100, warmup=10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, warmup=10) == pytest.approx(1.0)
    assert lr_at(10, 1.0, 100, warmup=10) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 100, warmup=10, min_ratio=0.05) == pytest.approx(0.05)
    mid = lr_at(55, 1.0, 100, warmup=10, min_ratio=0.0)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_normaliser_roundtrip() -> None:
    import numpy as np

    y = np.array([100.0, 300.0, 500.0])
    n = Normaliser.fit(y)
    assert n.mean == pytest.approx(300.0)
    assert Normaliser.from_dict(n.to_dict()) == n
    assert float(n.decode(torch.tensor(0.0))) == pytest.approx(300.0)


def _linear_problem(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=g)
    w = torch.tensor([[1.0], [2.0], [-1.0]])
    y = (5.0 + x @ w).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, y


def test_run_loop_learns_and_counts() -> None:
    torch.manual_seed(0)
    x, y = _linear_problem(256)
    model = build_model("mlp", 3, 1, (2, 2), hidden=32, layers=2)
    norm = Normaliser(mean=5.0, std=1.0)

    def batches():
        while True:
            i = torch.randint(0, 256, (32,))
            yield x[i], y[i]

    before = evaluate(model, x, y, norm)
    seen = []
    stats = run_loop(
        model,
        batches(),
        norm,
        Schedule(3e-3, 300, warmup=10),
        LoopHooks(validate=lambda: evaluate(model, x, y, norm), on_validate=lambda s: seen.append(s.step)),
        validate_every=100,
    )
    assert stats.step == 300 and stats.samples_seen == 300 * 32
    assert seen == [100, 200, 300]
    assert stats.validation_error < 0.2 * before


def test_run_loop_stops_at_end_of_stream() -> None:
    x, y = _linear_problem(8)
    model = build_model("mlp", 3, 1, (2, 2), hidden=8, layers=1)
    stream = iter([(x, y), (x, y), None])
    stats = run_loop(
        model,
        stream,
        Normaliser(5.0, 1.0),
        Schedule(1e-3, 100),
        LoopHooks(validate=lambda: 0.5),
        validate_every=50,
    )
    assert stats.step == 2
    assert stats.history == [(2, 0.5)]  # validated once more at the end of the stream


def test_running_normaliser_matches_the_statistics_of_everything_seen() -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    norm = Normaliser()
    xs, ys = [], []
    for k in range(7):  # batches of different sizes and scales
        x = rng.normal(3.0 + k, 2.0, size=(5 + k, 2, 4, 3))
        x[:, 1] = 7.0  # a constant channel
        y = rng.normal(-1.0, 0.5 + k, size=(5 + k, 1, 4, 3))
        norm.update(x, y)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert norm.mean == pytest.approx(y.mean(), rel=1e-9)
    assert norm.std == pytest.approx(y.std(), rel=1e-9)
    assert norm.x_mean[0] == pytest.approx(x[:, 0].mean(), rel=1e-9)
    assert norm.x_std[0] == pytest.approx(x[:, 0].std(), rel=1e-9)
    assert norm.x_mean[1] == pytest.approx(7.0) and norm.x_std[1] == 1.0
    again = Normaliser.from_dict(norm.to_dict())
    assert again.x_mean == norm.x_mean and again.std == norm.std


def test_step_schedule_halves_every_interval_and_mse() -> None:
    assert lr_at(0, 1e-3, 1000, schedule="step", decay_every=100) == pytest.approx(1e-3)
    assert lr_at(99, 1e-3, 1000, schedule="step", decay_every=100) == pytest.approx(1e-3)
    assert lr_at(250, 1e-3, 1000, schedule="step", decay_every=100) == pytest.approx(2.5e-4)
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, 1.0, 10, schedule="linear")
    from trainer.loop import mse

    assert float(mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))) == pytest.approx(5.0)


def test_moments_merged_across_ranks_equal_the_union_statistics() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    parts = [
        (rng.normal(2.0 * r, 1.0 + r, size=(4 + r, 3, 5)), rng.normal(100.0 * r, 3.0 + r, size=(4 + r, 1, 5)))
        for r in range(3)
    ]
    merged = Moments.of(*parts[0])
    for x, y in parts[1:]:
        merged = merged.merge(Moments.of(x, y))
    norm = Normaliser()
    norm.absorb(merged)
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    assert norm.count == x.shape[0]
    assert norm.mean == pytest.approx(y.mean(), rel=1e-12)
    assert norm.std == pytest.approx(y.std(), rel=1e-12)
    np.testing.assert_allclose(norm.x_mean, x.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(norm.x_std, x.std(axis=(0, 2)), rtol=1e-10)


def test_schedule_object_is_lr_at() -> None:
    s = Schedule(1e-3, 1000, warmup=10, kind="step", decay_every=100, decay_gamma=0.5)
    for step in (0, 5, 10, 99, 250, 999):
        assert s.lr(step) == lr_at(step, 1e-3, 1000, 10, schedule="step", decay_every=100, decay_gamma=0.5)
    with pytest.raises(ValueError, match="schedule"):
        Schedule(1e-3, 10, kind="linear")


@pytest.mark.parametrize("loss", ["rel_l2", "mse"])
def test_per_sample_losses_average_to_the_loss(loss: str) -> None:
    torch.manual_seed(1)
    pred, target = torch.randn(7, 2, 5), torch.randn(7, 2, 5)
    each = PER_SAMPLE[loss](pred, target)
    assert each.shape == (7,)
    assert float(each.mean()) == pytest.approx(float(LOSSES[loss](pred, target)), rel=1e-6)
    # rel_l2 of one sample by hand: ||p - t|| / ||t||
    if loss == "rel_l2":
        assert float(each[3]) == pytest.approx(float((pred[3] - target[3]).norm() / target[3].norm()), rel=1e-6)


def test_the_loop_reports_each_rows_loss_with_its_simulation_id_and_the_step_loss_is_their_mean() -> None:
    torch.manual_seed(0)
    x, y = _linear_problem(64)
    model = build_model("mlp", 3, 1, (2, 2), hidden=8, layers=1)
    ids = np.arange(64) // 8  # 8 rows per simulation
    reported: list[tuple[np.ndarray, np.ndarray]] = []
    losses: list[float] = []

    def batches():
        for k in range(4):
            rows = slice(16 * k, 16 * (k + 1))
            yield x[rows], y[rows], 16, ids[rows]

    run_loop(
        model,
        batches(),
        Normaliser(5.0, 1.0),
        Schedule(1e-3, 4),
        LoopHooks(
            validate=lambda: 0.5,
            on_sample_losses=lambda i, v: reported.append((i, v)),
            on_progress=lambda s: losses.append(s.loss),
        ),
        validate_every=10,
    )
    assert [r[0].tolist() for r in reported] == [ids[16 * k : 16 * (k + 1)].tolist() for k in range(4)]
    for (_, v), step_loss in zip(reported, losses, strict=True):
        assert v.shape == (16,) and np.all(v >= 0)
        assert float(v.mean()) == pytest.approx(step_loss, rel=1e-5)


def test_simulation_losses_are_summed_by_id_and_drained_once() -> None:
    acc = SimulationLosses()
    acc.add(np.array([4, 1, 4, 9]), np.array([1.0, 2.0, 3.0, np.nan]))  # a NaN (diverged row) is left out
    acc.add(np.array([1]), np.array([4.0]))
    ids, means, counts = acc.drain()
    got = {int(i): (float(m), int(c)) for i, m, c in zip(ids, means, counts, strict=True)}
    assert got == {4: (2.0, 2), 1: (3.0, 2)}
    assert len(acc) == 0 and acc.drain()[0].size == 0
    with pytest.raises(ValueError, match="must match"):
        acc.add(np.array([1, 2]), np.array([1.0]))
