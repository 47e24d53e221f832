"""Deep ensembles: shapes, spread, online bagging, calibration, and the round trip through the model store."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import solvers
from trainer.card import CardError, ModelCard
from trainer.checkpoint import load_training_state, save_training_state
from trainer.ensemble import (
    ONE_SIGMA,
    TWO_SIGMA,
    Ensemble,
    bagged_loss,
    bagging_weights,
    build_ensemble,
    calibrate,
    coverage,
    ensemble_spread,
    mean_std,
    members_of,
    point_scores,
    ratio_histogram,
)
from trainer.loop import PER_SAMPLE, LoopStats, Normaliser, evaluate, make_card, rel_l2, train_step
from trainer.problem import ProblemSpec
from trainer.store import ModelStore, StoreError

ARCH = {"hidden": 16, "layers": 2}
SOLVER = {"n": 4, "steps": 4, "dt": 0.01}
SPEC = ProblemSpec.from_solver(solvers.get("heat2d", **SOLVER), SOLVER)


def _ensemble(k: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_ensemble(k, "mlp", SPEC.in_channels, 1, SPEC.grid, **ARCH)


def _card(calibration: dict | None) -> dict:
    return make_card(
        problem=SPEC.to_dict(),
        model_name="mlp",
        arch=ARCH,
        in_channels=SPEC.in_channels,
        out_channels=1,
        grid=SPEC.grid,
        norm=Normaliser(300.0, 100.0),
        stats=LoopStats(step=3, samples_seen=96, validation_error=0.25),
        study_id="s0",
        ensemble=calibration,
    )


def test_members_predict_together_and_differ_by_their_initialisation() -> None:
    ens = _ensemble(3)
    x = torch.rand(5, SPEC.in_channels)
    out = ens(x)
    assert out.shape == (3, 5, 1, *SPEC.grid)
    assert members_of(ens) == 3 and members_of(build_ensemble(1, "mlp", SPEC.in_channels, 1, SPEC.grid)) == 0
    assert not isinstance(build_ensemble(1, "mlp", SPEC.in_channels, 1, SPEC.grid), Ensemble)
    for i in range(3):  # each member is an ordinary model applied to the same input
        assert torch.equal(out[i], ens.members[i](x))
    assert not torch.equal(out[0], out[1])  # different initial weights
    assert torch.equal(_ensemble(3, seed=7)(x), _ensemble(3, seed=7)(x))  # reproducible from the seed
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble([ens.members[0]])


def test_spread_is_non_negative_and_zero_for_identical_members() -> None:
    ens = _ensemble(4)
    x = torch.rand(6, SPEC.in_channels)
    norm = Normaliser(300.0, 100.0)
    mean, std = ensemble_spread(ens, x, norm)
    assert mean.shape == std.shape == (6, 1, *SPEC.grid)
    assert torch.all(std >= 0) and float(std.max()) > 0
    # The mean is the members' mean of the decoded predictions.
    torch.testing.assert_close(mean, norm.decode(ens(x)).mean(0))
    for m in ens.members[1:]:
        m.load_state_dict(ens.members[0].state_dict())
    mean, std = ensemble_spread(ens, x, norm)
    assert torch.count_nonzero(std) == 0
    torch.testing.assert_close(mean, norm.decode(ens.members[0](x)))
    scores = point_scores(ens, norm, SPEC, np.array([SPEC.params.low, SPEC.params.high]))
    assert scores.shape == (2,) and np.all(scores == 0)


def test_coverage_of_a_constructed_case() -> None:
    err = np.array([0.0, 0.5, -0.9, 1.0, 1.5, -2.5, 3.0, -0.1])
    std = np.ones_like(err)
    assert coverage(err, std) == 5 / 8  # |err| <= 1: 0, 0.5, 0.9, 1.0, 0.1
    assert coverage(err, std, 2.0) == 6 / 8
    assert coverage(err, 2 * std) == 6 / 8


def test_calibration_fits_the_scale_of_an_overconfident_spread() -> None:
    g = torch.Generator().manual_seed(0)
    n, sigma = 200_000, 0.3
    spread = torch.full((n,), sigma / 2)  # the members claim half the real error
    fit = ratio_histogram(torch.randn(n, generator=g) * sigma, spread)
    check = ratio_histogram(torch.randn(n, generator=g) * sigma, spread)
    c = calibrate(fit, check, members=4)
    assert c.members == 4 and c.values == n
    assert c.std_scale == pytest.approx(2.0, rel=0.03)
    assert c.within_1sigma == pytest.approx(ONE_SIGMA, abs=0.01)
    assert c.within_2sigma == pytest.approx(TWO_SIGMA, abs=0.01)
    assert c.raw_within_1sigma == pytest.approx(math.erf(0.5 / math.sqrt(2)), abs=0.01)  # P(|Z| <= 1/2)


def test_ratio_histograms_add_up_over_ranks_and_handle_zeros() -> None:
    a, b = torch.randn(100), torch.randn(50)
    sa, sb = torch.rand(100) + 0.1, torch.rand(50) + 0.1
    torch.testing.assert_close(
        ratio_histogram(a, sa) + ratio_histogram(b, sb), ratio_histogram(torch.cat([a, b]), torch.cat([sa, sb]))
    )
    # An exact answer counts as covered (even with no spread); an error with no spread never is.
    h = ratio_histogram(torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]))
    c = calibrate(ratio_histogram(torch.randn(1000), torch.ones(1000)), h, members=2)
    assert c.within_1sigma == pytest.approx(2 / 3) and c.values == 3
    # Nothing to fit on: the bare spread is served, coverage unknown.
    empty = ratio_histogram(torch.zeros(0), torch.zeros(0))
    c = calibrate(empty, empty, members=2)
    assert c.std_scale == 1.0 and c.within_1sigma is None


def test_online_bagging_weights_are_poisson_and_a_member_without_weight_learns_nothing() -> None:
    torch.manual_seed(0)
    w = bagging_weights(4, 50_000)
    assert w.shape == (4, 50_000)
    assert float(w.mean()) == pytest.approx(1.0, abs=0.02) and float(w.var()) == pytest.approx(1.0, abs=0.03)
    params = torch.ones(2, 3, requires_grad=True)
    each = params * torch.arange(3.0)  # (K=2, B=3)
    bagged_loss(each, torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])).backward()
    assert params.grad is not None
    torch.testing.assert_close(params.grad[0], torch.tensor([0.0, 2.0, 0.0]) / 3)
    assert torch.count_nonzero(params.grad[1]) == 0


def test_train_step_trains_every_member_and_reports_their_mean_loss() -> None:
    torch.manual_seed(1)
    ens = _ensemble(3, seed=1)
    opt = torch.optim.Adam(ens.parameters(), lr=3e-3)
    x = torch.rand(64, SPEC.in_channels)
    y = 300.0 + 50.0 * torch.sin(3 * x[:, :1, None, None]) * torch.ones(64, 1, *SPEC.grid)
    norm = Normaliser(300.0, 50.0)
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        before = [float(rel_l2(norm.decode(m(x)), y)) for m in ens.members]
    first = train_step(ens, opt, x, y, norm, 3e-3, rel_l2, PER_SAMPLE["rel_l2"], kept.append)
    assert first == pytest.approx(np.mean(before), rel=1e-5)  # the members' plain mean, before the update
    assert float(kept[0].mean()) == pytest.approx(first, rel=1e-5)
    assert kept[0].shape == (64,)
    for _ in range(200):
        loss = train_step(ens, opt, x, y, norm, 3e-3)
    with torch.no_grad():
        after = [float(rel_l2(norm.decode(m(x)), y)) for m in ens.members]
    assert all(a < b / 2 for a, b in zip(after, before, strict=True)), (before, after)
    assert loss < first / 2
    with torch.no_grad():
        preds = norm.decode(ens(x))
    assert evaluate(ens, x, y, norm) == pytest.approx(float(rel_l2(preds.mean(0), y)), rel=1e-5)
    # Bagging and initialisation keep the members apart.
    _, std = mean_std(preds)
    assert float(std.max()) > 0


def test_an_ensemble_round_trips_through_the_store(tmp_path) -> None:
    ens = _ensemble(3)
    cal = {"members": 3, "std_scale": 1.7, "within_1sigma": 0.69, "within_2sigma": 0.95, "raw_within_1sigma": 0.4}
    store = ModelStore(tmp_path)
    v = store.publish("ens", ens, _card(cal))
    keys = load_file(str(tmp_path / "ens" / f"{v:06d}" / "weights.safetensors"))
    assert {k.split(".")[1] for k in keys} == {"0", "1", "2"} and all(k.startswith("members.") for k in keys)
    m = store.load("ens")
    assert isinstance(m.model, Ensemble) and m.members == 3
    assert m.card.ensemble is not None and m.card.ensemble.std_scale == 1.7 and m.card.ensemble.within_1sigma == 0.69
    x = torch.rand(4, SPEC.in_channels)
    torch.testing.assert_close(m.model(x), ens(x))
    assert m.values_per_row == 2 * int(np.prod(SPEC.out_shape))  # mean and std
    # A card that claims another number of members does not fit the weights.
    store.publish("ens", _ensemble(2), _card({"members": 3, "std_scale": 1.0}))
    with pytest.raises(StoreError, match="do not fit"):
        store.load("ens")


@pytest.mark.parametrize(
    ("ensemble", "needle"),
    [({"members": 1}, "members must be >= 2"), ({"members": 3, "std_scale": 0}, "std_scale"), ([3], "object")],
)
def test_a_malformed_ensemble_block_is_refused(ensemble, needle: str) -> None:
    card = _card(None)
    card["ensemble"] = ensemble
    with pytest.raises(CardError, match=needle):
        ModelCard.from_dict(card)


def test_an_ensembles_training_state_resumes(tmp_path) -> None:
    ens = _ensemble(2)
    opt = torch.optim.Adam(ens.parameters(), lr=1e-3)
    x, y = torch.rand(8, SPEC.in_channels), torch.rand(8, 1, *SPEC.grid) + 1
    train_step(ens, opt, x, y, Normaliser(), 1e-3)
    save_training_state(tmp_path, ens, opt, Normaliser(), LoopStats(step=1))
    other = _ensemble(2, seed=5)
    load_training_state(tmp_path, other, torch.optim.Adam(other.parameters(), lr=1e-3))
    torch.testing.assert_close(other(x), ens(x))
