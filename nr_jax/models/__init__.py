"""Model registry: `get(name, **kwargs)` builds a model by name, `names()` lists them.

Adding a model family means adding a module here that calls `register`; no trainer code changes.
"""

from __future__ import annotations

from collections.abc import Callable

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


def get(name: str, **kwargs) -> nn.Module:
    """Builds the registered model `name` (e.g. `get("vgg19_cifar", num_classes=10)`).

    Raises:
      ConfigError: `name`, or the `scheme` / `conv_weight_grad` keyword, is not a known one (the
        one-line message of `nr_jax.config.refuse`, naming the config field that sets it).
    """
    if name not in _REGISTRY:
        refuse("model", name, f"one of {names()}")
    if "scheme" in kwargs and kwargs["scheme"] not in SCHEMES:
        refuse("nr.scheme", kwargs["scheme"], f"one of {SCHEMES}")
    if "conv_weight_grad" in kwargs and kwargs["conv_weight_grad"] not in CONV_WEIGHT_GRADS:
        refuse("conv_weight_grad", kwargs["conv_weight_grad"], f"one of {CONV_WEIGHT_GRADS}")
    return _REGISTRY[name](**kwargs)


from nr_jax.models import densenet, resnet, vgg, vgg_imagenet  # noqa: E402,F401  (registration)
