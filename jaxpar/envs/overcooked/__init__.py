"""Overcooked exact to overcooked-ai 1.1.0: `make("overcooked", layout=...)` with the layouts in `LAYOUTS`
(cramped_room, asymmetric_advantages, coordination_ring, forced_coordination, counter_circuit, and the
onion-only counter_circuit_o_1order). Importing this package registers the id."""

from jaxpar.envs.overcooked.layouts import LAYOUTS, Layout
from jaxpar.envs.overcooked.overcooked import Overcooked, OvercookedState

__all__ = ["LAYOUTS", "Layout", "Overcooked", "OvercookedState"]
