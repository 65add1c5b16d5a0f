from jaxpar.envs.switch_riddle.switch_riddle import SwitchRiddle, SwitchRiddleState

__all__ = ["SwitchRiddle", "SwitchRiddleState"]
