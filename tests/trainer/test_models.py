"""Every registered model: forward shapes, learns a fixed batch, survives save -> load."""

from __future__ import annotations

import pytest
import torch

import solvers
from trainer.loop import LoopStats, Normaliser, make_card, rel_l2, train_step
from trainer.models import MODELS, available, build_model
from trainer.problem import ProblemSpec
from trainer.store import ModelStore

GRID = (16, 16)
_HEAT = {"n": GRID[0], "steps": 4, "dt": 0.01}


def _card(name: str, arch: dict) -> dict:
    """A card for a 6-input network on GRID (the store rebuilds from the card's architecture only)."""
    spec = ProblemSpec.from_solver(solvers.get("heat2d", **_HEAT), _HEAT)
    return make_card(
        problem=spec.to_dict(),
        model_name=name,
        arch=arch,
        in_channels=6,
        out_channels=1,
        grid=GRID,
        norm=Normaliser(0.0, 1.0),
        stats=LoopStats(),
        study_id="s",
    )


SMALL = {
    "mlp": {"hidden": 32, "layers": 2},
    "fno": {"modes": 4, "width": 8, "layers": 2},
    "tfno": {"modes": 4, "width": 8, "layers": 2},
    "unet": {"width": 8, "depth": 2},
    "deeponet": {"hidden": 32, "layers": 2, "basis": 16},
}


def test_every_model_has_a_small_config() -> None:
    assert set(SMALL) == set(MODELS)


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("grid", [(16, 16), (13, 10), (32,), (85,)], ids=str)
@pytest.mark.parametrize("field_input", [False, True], ids=["vector-in", "field-in"])
def test_forward_shape(name: str, grid: tuple[int, ...], field_input: bool) -> None:
    # Parametric problems feed vectors (B, F); operator problems feed fields (B, F, *grid); odd grids too.
    model = build_model(name, 3, 2, grid, field_input=field_input, **SMALL[name])
    x = torch.randn(4, 3, *grid) if field_input else torch.randn(4, 3)
    out = model(x)
    assert out.shape == (4, 2, *grid)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", available())
def test_a_few_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, 6, 1, GRID, **SMALL[name])
    x = torch.rand(8, 6)
    xs = torch.linspace(0, 1, GRID[0])
    # A smooth target that depends on the inputs, offset so the relative error is well defined.
    y = 2.0 + x[:, :1, None, None] * torch.sin(torch.pi * xs)[None, None, :, None] * torch.ones(1, 1, 1, GRID[1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    norm = Normaliser(mean=2.0, std=1.0)
    with torch.no_grad():
        before = float(rel_l2(norm.decode(model(x)), y))
    for _ in range(80):
        train_step(model, opt, x, y, norm, lr=3e-3)
    with torch.no_grad():
        after = float(rel_l2(norm.decode(model(x)), y))
    assert after < 0.5 * before


@pytest.mark.parametrize("name", available())
def test_save_load_same_outputs(name: str, tmp_path) -> None:
    torch.manual_seed(1)
    model = build_model(name, 6, 1, GRID, **SMALL[name])
    card = _card(name, SMALL[name])
    store = ModelStore(tmp_path)
    v = store.publish("m", model, card)
    loaded = store.load("m", v)
    x = torch.randn(4, 6)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_unknown_model_and_bad_arch() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", 6, 1, GRID)
    with pytest.raises(ValueError, match="bad architecture for model 'mlp'"):
        build_model("mlp", 6, 1, GRID, depth=3)


def test_fno_paper_layer_without_channel_mlp(tmp_path) -> None:
    # channel_mlp=False is the FNO paper's layer: fewer parameters, and the card rebuilds it exactly.
    arch = {"modes": 4, "width": 8, "layers": 2}
    with_mlp = build_model("fno", 6, 1, GRID, **arch)
    paper = build_model("fno", 6, 1, GRID, **arch, channel_mlp=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(paper) < count(with_mlp)
    card = _card("fno", {**arch, "channel_mlp": False})
    store = ModelStore(tmp_path)
    loaded = store.load("m", store.publish("m", paper, card))
    x = torch.randn(2, 6)
    paper.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), paper(x), rtol=0, atol=0)
