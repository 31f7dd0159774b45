"""Every experiment config (and variant) passes validation; bad configs are refused by name."""

import importlib
import pathlib

import pytest

from nr_jax.config import ConfigError, base_config, validate

CONFIGS = sorted(
    p.stem
    for p in (pathlib.Path(__file__).parent.parent / "experiments" / "configs").glob("*.py")
    if p.stem not in ("__init__", "common")
)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates(name):
    module = importlib.import_module(f"experiments.configs.{name}")
    variants = ("nr", "baseline", "quick", "compress")
    takes_variant = "variant" in module.get_config.__code__.co_varnames
    for variant in variants if takes_variant else (None,):
        config = module.get_config(variant) if variant else module.get_config()
        config.data_parallel = False
        validate(config)
        assert module.__doc__ and "python -m experiments." in module.__doc__


BAD = [
    ("batch_size", 0, "config.batch_size"),
    ("eval_batch_size", -5, "config.eval_batch_size"),
    ("epochs", 0, "config.epochs"),
    ("optimizer", "lion", "config.optimizer"),
    ("preset", "paper", "config.preset"),
    ("lr", -0.1, "config.lr"),
    ("momentum", 1.0, "config.momentum"),
    ("lr_gamma", 0.0, "config.lr_gamma"),
    ("lr_milestones", (5, 3), "config.lr_milestones"),
    ("train_limit", -1, "config.train_limit"),
    ("checkpoint_every_steps", -8, "config.checkpoint_every_steps"),
    ("nr.target", 1.0, "config.nr.target"),
    ("nr.target", 0.0, "config.nr.target"),
    ("nr.lam", -1e-4, "config.nr.lam"),
    ("nr.resource", "memory", "config.nr.resource"),
    ("nr.threshold", 2.0, "config.nr.threshold"),
    ("nr.max_search_epochs", 0, "config.nr.max_search_epochs"),
    ("nr.on_search_timeout", "panic", "config.nr.on_search_timeout"),
    ("nr.min_width", 0, "config.nr.min_width"),
    ("nr.new_gamma", 0.0, "config.nr.new_gamma"),
    ("nr.rescale_target", -0.5, "config.nr.rescale_target"),
    ("nr.dormancy_tau", -0.1, "config.nr.dormancy_tau"),
    ("nr.activity_images", 0, "config.nr.activity_images"),
    ("nr.criterion", None, "config.nr.criterion"),
]


@pytest.mark.parametrize(("field", "value", "match"), BAD)
def test_bad_value_is_refused_by_name(field, value, match):
    config = base_config()
    config.data_parallel = False
    node = config.nr if field.startswith("nr.") else config
    node[field.split(".")[-1]] = value
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        validate(config)


# names are resolved by their registries (models, datasets, schemes, kernel modes, allocation
# rules, liveness criteria and pressures), with the same one-line message, when the run builds
# its trainer: before any compute
BAD_NAMES = [
    ("model", "resnet9000", "config.model"),
    ("dataset", "mnist3d", "config.dataset"),
    ("conv_weight_grad", "cudnn", "config.conv_weight_grad"),
    ("nr.scheme", "grouped", "config.nr.scheme"),
    ("nr.allocation", "cubic", "config.nr.allocation"),
    ("nr.allocation", "round", "config.nr.allocation"),
    ("nr.criterion", "gamma", "config.nr.criterion"),
    ("nr.pressure", "l2", "config.nr.pressure"),
]


@pytest.mark.parametrize(("field", "value", "match"), BAD_NAMES)
def test_bad_name_is_refused_before_compute(field, value, match, tmp_path, monkeypatch):
    from nr_jax import steps, train

    def no_compute(*args, **kwargs):
        raise AssertionError("init_state ran before the bad name was refused")

    monkeypatch.setattr(train, "init_state", no_compute)
    monkeypatch.setattr(steps, "init_state", no_compute)
    config = base_config()
    config.data_parallel = False
    node = config.nr if field.startswith("nr.") else config
    node[field.split(".")[-1]] = value
    validate(config)  # values are fine: only the name is unknown
    with pytest.raises(ConfigError, match=match.replace(".", r"\.") + " = "):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_batch_must_divide_over_devices():
    config = base_config()
    config.batch_size = 66  # 4 test devices
    with pytest.raises(ConfigError, match="config.batch_size"):
        validate(config)


def test_target_outside_range_is_fine_without_nr():
    config = base_config()
    config.data_parallel = False
    config.nr.enabled, config.nr.target = False, 1.0
    validate(config)
