"""Model registry: `get(name, **kwargs)` builds a model by name, `names()` lists them.

Adding a model family means adding a module here that calls `register`; no trainer code changes.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn

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
    """Builds the registered model `name` (e.g. `get("vgg19_cifar", num_classes=10)`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}")
    return _REGISTRY[name](**kwargs)


from nr_jax.models import densenet, resnet, vgg, vgg_imagenet  # noqa: E402,F401  (registration)
