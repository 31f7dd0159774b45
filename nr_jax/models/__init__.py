"""Model registry: `get(name, **kwargs)` builds a model by name, `names()` lists them.

Adding a model family means adding a module here that calls `register`; no trainer code changes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from nr_jax.config import refuse
from nr_jax.layers import SCHEMES
from nr_jax.ops import CONV_WEIGHT_GRADS

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under `name`."""

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def scaled_width(features: int, multiplier: float) -> int:
    """A unit's width `features` times `multiplier`, rounded half up, at least 1 channel.

    The families' `width_multiplier` field (`get(name, width_multiplier=1.5)` or
    `config.model_kwargs.width_multiplier`) scales every unit's default width with it; widths
    set by a `WidthSpec` (after rejuvenation) are used as they are.
    """
    return max(1, math.floor(features * multiplier + 0.5))


def get(name: str, *, model_kwargs: Mapping[str, Any] | None = None, **kwargs) -> nn.Module:
    """Builds the registered model `name` (e.g. `get("vgg19_cifar", num_classes=10)`).

    `model_kwargs` are the user's extra keywords (`config.model_kwargs`, passed by the trainer
    next to the keywords it sets from the rest of the config): one that is also in `kwargs`,
    that the registered factory fixes itself, or that the model does not know is refused with
    the one-line `ConfigError` naming `config.model_kwargs.<keyword>`.

    Every family takes `width_multiplier` (default 1.0): each unit's default width is scaled by
    it and rounded (`scaled_width`); the classifier keeps `num_classes` outputs.

    Raises:
      ConfigError: `name`, or the `scheme` / `conv_weight_grad` keyword, is not a known one, or
        `width_multiplier` is not a number > 0 (the one-line message of `nr_jax.config.refuse`,
        naming the config field that sets it).
    """
    if name not in _REGISTRY:
        refuse("model", name, f"one of {names()}")
    extra = dict(model_kwargs or {})
    for key in sorted(set(extra) & set(kwargs)):
        refuse(f"model_kwargs.{key}", extra[key], f"unset: the run sets {key} from the config")
    own, kwargs = kwargs, {**kwargs, **extra}
    m = kwargs.get("width_multiplier", 1.0)
    if isinstance(m, bool) or not isinstance(m, int | float) or not m > 0:
        refuse("model_kwargs.width_multiplier", m, "a number > 0 (1.0 = the default widths)")
    if "scheme" in kwargs and kwargs["scheme"] not in SCHEMES:
        refuse("nr.scheme", kwargs["scheme"], f"one of {SCHEMES}")
    if "conv_weight_grad" in kwargs and kwargs["conv_weight_grad"] not in CONV_WEIGHT_GRADS:
        refuse("conv_weight_grad", kwargs["conv_weight_grad"], f"one of {CONV_WEIGHT_GRADS}")
    try:
        return _REGISTRY[name](**kwargs)
    except TypeError as e:
        _refuse_keyword(name, e, extra, own)  # a model_kwargs keyword the factory refused
        raise


_UNKNOWN = re.compile(r"unexpected keyword argument '(\w+)'")
_FIXED = re.compile(r"multiple values for (?:keyword )?argument '(\w+)'")


def _refuse_keyword(
    name: str, error: TypeError, extra: dict[str, Any], own: dict[str, Any]
) -> None:
    """Turns a factory's `TypeError` about one of the user's keywords into the one-line refusal
    (naming the model's fields); returns for any other `TypeError`."""
    for pattern in (_UNKNOWN, _FIXED):
        match = pattern.search(str(error))
        if match is None or match.group(1) not in extra:
            continue
        key = match.group(1)
        if pattern is _FIXED:
            refuse(f"model_kwargs.{key}", extra[key], f"unset: model {name!r} fixes {key} itself")
        model = _REGISTRY[name](**own)
        fields = [
            f.name
            for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name", *own)
        ]
        refuse(f"model_kwargs.{key}", extra[key], f"a keyword of model {name!r}: one of {fields}")


from nr_jax.models import (  # noqa: E402,F401  (registration)
    densenet,
    mlp,
    resnet,
    vgg,
    vgg_imagenet,
)
