"""Environment ids -> constructors, filled by the `register` decorator where each environment is defined."""

from __future__ import annotations

from collections.abc import Callable

from jaxpar.envs.core import MultiAgentEnv

_REGISTRY: dict[str, Callable[..., MultiAgentEnv]] = {}


def register(env_id: str):
    """Class (or factory) decorator: `make(env_id, **kwargs)` will call it with those kwargs."""

    def decorate(constructor):
        if env_id in _REGISTRY:
            raise ValueError(
                f"environment id {env_id!r} is registered twice ({_REGISTRY[env_id]} and "
                f"{constructor}); ids must be unique."
            )
        _REGISTRY[env_id] = constructor
        return constructor

    return decorate


def make(env_id: str, **kwargs) -> MultiAgentEnv:
    """A new environment by id, e.g. `make("simple_spread_v3", N=4, continuous_actions=True)`."""
    if env_id not in _REGISTRY:
        raise KeyError(f"unknown environment id {env_id!r}; registered ids: {sorted(_REGISTRY)}")
    return _REGISTRY[env_id](**kwargs)


def registered_ids() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))
