"""Study configs: every shipped one loads; bad ones fail with one message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import CONFIG_DIR, ConfigError, load_config, parse_config, parse_yaml
from services.sampling import Sampler, simulation_seeds
from solvers.base import ParamSpace

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert {p.name for p in SHIPPED} >= {"heat2d-mlp.yaml", "heat2d-fno.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.buffer.watermark <= cfg.buffer.capacity


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"training": {"batch_size": 0}}, "training.batch_size: Input should be greater than or equal to 1"),
        ({"training": {"model": "resnet"}}, "training.model: unknown model 'resnet'"),
        ({"buffer": {"policy": "lifo"}}, "buffer.policy: Input should be 'fifo', 'firo' or 'reservoir'"),
        ({"buffer": {"capacity": 10, "watermark": 20}}, "buffer: watermark (20) must not exceed capacity (10)"),
        ({"problem": {"solver": "heat3d"}}, "problem: unknown solver 'heat3d'"),
        ({"problem": {"config": {"n": 2}}}, "heat2d.n must be an integer >= 4"),
        ({"problem": {"config": {"dx": 2}}}, "unknown heat2d setting(s) ['dx']"),
        ({"trainig": {}}, "trainig: Extra inputs are not permitted"),
        ({"training": {"arch": {"depth": 3}}}, "training: unknown mlp setting(s) ['depth']"),
        ({"simulations": -1}, "simulations: Input should be greater than or equal to 1"),
        ({"sampler": {"kind": "breed", "breed": {"start": 0.8, "end": 0.5}}}, "start (0.8) must not exceed end"),
        ({"sampler": {"kind": "breed", "breed": {"sigma": 0}}}, "sampler.breed.sigma: Input should be greater"),
        ({"sampler": {"kind": "breed", "breed": {"sigmas": 0.1}}}, "sampler.breed.sigmas: Extra inputs"),
        ({"sampler": {"breed": {"sigma": 0.1}}}, "sampler.breed is set but sampler.kind is 'uniform'"),
        (
            {"sampler": {"kind": "ogas"}},
            "sampler.kind: Input should be 'uniform', 'sobol', 'breed', 'uncertainty' or 'queries'",
        ),
        ({"training": {"ensemble": 0}}, "training.ensemble: Input should be greater than or equal to 1"),
        ({"sampler": {"kind": "uncertainty"}}, "set training.ensemble to 2 or more (it is 1)"),
        ({"sampler": {"uncertainty": {"pool": 8}}}, "sampler.uncertainty is set but sampler.kind is 'uniform'"),
        (
            {"sampler": {"kind": "uncertainty", "breed": {"sigma": 0.1}}, "training": {"ensemble": 2}},
            "sampler.breed is set but sampler.kind is 'uncertainty'",
        ),
        (
            {"sampler": {"kind": "uncertainty", "uncertainty": {"mix": "sobol"}}, "training": {"ensemble": 2}},
            "sampler.uncertainty.mix: Input should be 'uniform' or 'breed'",
        ),
        (
            {
                "problem": {"solver": "advection1d", "config": {}, "kind": "operator", "inputs": ["u"]},
                "sampler": {"kind": "uncertainty"},
                "training": {"ensemble": 2, "model": "fno"},
            },
            "this problem's model takes input fields",
        ),
        (
            {
                "problem": {"solver": "ks1d", "config": {}},
                "sampler": {"kind": "uncertainty"},
                "training": {"ensemble": 2},
            },
            "uncertainty moves parameter points, and solver 'ks1d' has no scalar parameters",
        ),
        (
            {"problem": {"solver": "ks1d", "config": {}}, "sampler": {"kind": "breed"}},
            "breed moves parameter points, and solver 'ks1d' has no scalar parameters",
        ),
        ({"sampler": {"queries": {"fraction": 0.2}}}, "sampler.queries is set but sampler.kind is 'uniform'"),
        ({"sampler": {"kind": "queries", "queries": {"fraction": 1.5}}}, "sampler.queries.fraction: Input should be"),
        ({"sampler": {"kind": "queries", "queries": {"jitter": -0.1}}}, "sampler.queries.jitter: Input should be"),
        (
            {"problem": {"solver": "ks1d", "config": {}}, "sampler": {"kind": "queries"}},
            "queries moves parameter points, and solver 'ks1d' has no scalar parameters",
        ),
    ],
)
def test_invalid_config_names_the_field(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert message in str(e.value)


def test_an_uncertainty_sampler_may_mix_with_breed() -> None:
    cfg = parse_config(
        {
            "sampler": {"kind": "uncertainty", "uncertainty": {"mix": "breed"}, "breed": {"sigma": 0.02}},
            "training": {"ensemble": 4},
        }
    )
    assert cfg.sampler.breeds and cfg.sampler.adaptive and cfg.sampler.breed_settings()["sigma"] == 0.02
    assert cfg.training.ensemble == 4


def test_yaml_errors() -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("name: [unclosed")
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_yaml("- a\n- b")
    with pytest.raises(ConfigError, match="cannot read study config"):
        load_config("/nonexistent/study.yaml")


@pytest.mark.parametrize("kind", ["uniform", "sobol"])
def test_samplers_stay_in_bounds_and_repeat(kind: str) -> None:
    space = ParamSpace(("a", "b"), (100.0, -1.0), (500.0, 1.0))
    a = Sampler(space, kind, seed=3).draw(64)
    b = Sampler(space, kind, seed=3).draw(64)
    assert a.shape == (64, 2)
    assert (a >= space.low).all() and (a <= space.high).all()
    assert (a == b).all()
    # Both fill the box: each half of each axis holds a fair share of the points.
    assert ((a[:, 0] > 300).mean()) == pytest.approx(0.5, abs=0.2)


def test_sobol_is_more_even_than_uniform() -> None:
    from scipy.stats import qmc

    space = ParamSpace(("a", "b"), (0.0, 0.0), (1.0, 1.0))
    d_sobol = qmc.discrepancy(Sampler(space, "sobol", 0).draw(256))
    d_unif = qmc.discrepancy(Sampler(space, "uniform", 0).draw(256))
    assert d_sobol < d_unif


def test_simulation_seeds_depend_only_on_id() -> None:
    import numpy as np

    a = simulation_seeds(7, np.array([1, 2, 3]))
    b = simulation_seeds(7, np.array([3, 2, 1]))
    assert list(a) == list(b[::-1])
    assert len(set(simulation_seeds(7, np.arange(100)))) == 100


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"problem": {"solver": "burgers1d", "config": {"resolution": 1000}, "kind": "operator", "inputs": ["u"]}},
            "burgers1d.resolution",
        ),
        (
            {"problem": {"solver": "advection1d", "kind": "operator", "inputs": ["u"], "bounds": {"beta": [0.0, 9.0]}}},
            "bounds.beta: [0.0, 9.0] must be a non-empty interval inside [0.1, 4.0]",
        ),
        ({"problem": {"solver": "advection1d", "bounds": {"gamma": [1, 2]}}}, "unknown parameter(s) ['gamma']"),
        ({"problem": {"solver": "darcy2d", "kind": "operator", "inputs": ["k"]}}, "unknown field(s) ['k']"),
        ({"problem": {"solver": "darcy2d"}}, "a parametric problem needs a solver that records at least two times"),
        ({"problem": {"solver": "ns2d", "config": {"dt": 0.01}}}, "ns2d.dt"),
    ],
)
def test_problem_settings_are_checked_before_anything_runs(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(data)
    assert message in str(e.value)


def test_bounds_narrow_the_card_parameters() -> None:
    cfg = parse_config(
        {"problem": {"solver": "advection1d", "kind": "operator", "inputs": ["u"], "bounds": {"beta": [0.5, 1.0]}}}
    )
    assert cfg.problem.spec().params.low == (0.5,) and cfg.problem.spec().params.high == (1.0,)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_builds_its_model(path: Path) -> None:
    import torch

    from trainer.models import build_model

    cfg = load_config(path)
    spec = cfg.problem.spec()
    t = cfg.training
    model = build_model(t.model, spec.in_channels, len(spec.outputs), spec.grid, field_input=spec.field_input, **t.arch)
    with torch.no_grad():
        out = model(torch.zeros(2, *spec.in_shape))
    assert tuple(out.shape) == (2, *spec.out_shape)
