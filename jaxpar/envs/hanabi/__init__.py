from jaxpar.envs.hanabi.hanabi import Hanabi, HanabiState

__all__ = ["Hanabi", "HanabiState"]
