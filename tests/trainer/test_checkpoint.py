"""Training state for resuming: a run stopped at step k and resumed from its saved state ends
bit-identical to the run that never stopped, normalisation still being refined included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.checkpoint import CheckpointError, load_training_state, save_training_state
from trainer.loop import LoopHooks, Normaliser, Schedule, evaluate, run_loop
from trainer.models import build_model


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, generator=g)
    y = (5.0 + x @ torch.tensor([[1.0], [2.0], [-1.0]])).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return x, y


def _batches(x: torch.Tensor, y: torch.Tensor, start: int, stop: int):
    # The same batch at each step index whatever run draws it (the stream a resumed run sees is fresh).
    for step in range(start, stop):
        i = torch.randint(0, x.shape[0], (16,), generator=torch.Generator().manual_seed(step))
        yield x[i], y[i]


def _run(model, opt, norm, x, y, start, stop, on_validate=None, resume=None):
    hooks = LoopHooks(validate=lambda: evaluate(model, x, y, norm), on_validate=on_validate)
    return run_loop(
        model,
        _batches(x, y, start, stop),
        norm,
        Schedule(3e-3, 60, warmup=5),
        hooks,
        validate_every=20,
        norm_steps=30,  # the save at step 20 falls while the normaliser is still being refined
        opt=opt,
        start=resume,
    )


def test_resumed_run_ends_identical_to_the_uninterrupted_one(tmp_path) -> None:
    x, y = _data()
    torch.manual_seed(0)
    ref = build_model("mlp", 3, 1, (2, 2), hidden=16, layers=2)
    torch.manual_seed(0)
    cut = build_model("mlp", 3, 1, (2, 2), hidden=16, layers=2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3)
    ref_norm = Normaliser()
    ref_stats = _run(ref, ref_opt, ref_norm, x, y, 0, 60)

    # The run that is cut: its state saved at step 20 (as a study does at each validation), then lost.
    cut_opt, cut_norm = torch.optim.Adam(cut.parameters(), lr=3e-3), Normaliser()

    def save(s):
        if s.step == 20:
            save_training_state(tmp_path / "ck", cut, cut_opt, cut_norm, s, extra={"version": 1})

    _run(cut, cut_opt, cut_norm, x, y, 0, 35, on_validate=save)

    torch.manual_seed(123)  # a fresh process: other initial weights, other RNG state
    fresh = build_model("mlp", 3, 1, (2, 2), hidden=16, layers=2)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=3e-3)
    norm, stats, extra = load_training_state(tmp_path / "ck", fresh, fresh_opt)
    assert stats.step == 20 and stats.samples_seen == 20 * 16 and extra == {"version": 1}
    assert norm.count == 20 * 16
    end = _run(fresh, fresh_opt, norm, x, y, 20, 60, resume=stats)
    assert end.step == ref_stats.step == 60 and end.samples_seen == ref_stats.samples_seen
    for a, b in zip(fresh.state_dict().values(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert norm.to_dict() == ref_norm.to_dict()
    assert end.history == ref_stats.history
    assert end.validation_error == ref_stats.validation_error


def test_a_state_of_another_model_or_none_is_refused(tmp_path) -> None:
    small = build_model("mlp", 3, 1, (2, 2), hidden=16, layers=2)
    opt = torch.optim.Adam(small.parameters())
    from trainer.loop import LoopStats

    save_training_state(tmp_path / "ck", small, opt, Normaliser(), LoopStats())
    big = build_model("mlp", 3, 1, (2, 2), hidden=32, layers=2)
    with pytest.raises(CheckpointError, match="another model"):
        load_training_state(tmp_path / "ck", big, torch.optim.Adam(big.parameters()))
    with pytest.raises(CheckpointError, match="no readable training state"):
        load_training_state(tmp_path / "none", small, opt)
    (tmp_path / "ck" / "state.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not hold a Surge training state"):
        load_training_state(tmp_path / "ck", small, opt)
    assert np.isfinite(evaluate(small, torch.rand(4, 3), torch.rand(4, 1, 2, 2), Normaliser()))
