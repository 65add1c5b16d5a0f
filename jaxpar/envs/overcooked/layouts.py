"""The Overcooked layouts of overcooked-ai 1.1.0, written out here so jaxpar does not need that package.

Grid characters are the original's: X counter, P pot, O onion dispenser, T tomato dispenser, D dish
dispenser, S serving window, ' ' floor, 1/2 the players' start cells (floor). Rows are y (top first),
columns x. Orders and the recipe parameters are the layout files' own; everything not set there takes
overcooked-ai's default (value 20 and cook time 20 for every recipe, bonus factor 2, 3 ingredients at most).
"""

from __future__ import annotations

import dataclasses

import numpy as np

ONION, TOMATO = 0, 1
MAX_INGREDIENTS = 3


@dataclasses.dataclass(frozen=True)
class Layout:
    name: str
    grid: tuple[str, ...]
    all_orders: tuple[tuple[int, int], ...]  # (onions, tomatoes) of each recipe that earns a reward
    bonus_orders: tuple[tuple[int, int], ...] = ()
    onion_value: int | None = None  # per-ingredient values and times (counter_circuit); None -> 20 per recipe
    tomato_value: int | None = None
    onion_time: int | None = None
    tomato_time: int | None = None
    order_bonus: int = 2

    @property
    def width(self) -> int:
        return len(self.grid[0])

    @property
    def height(self) -> int:
        return len(self.grid)

    def terrain(self) -> np.ndarray:
        """[width, height] characters, indexed [x, y], players' cells as floor."""
        rows = [row.replace("1", " ").replace("2", " ") for row in self.grid]
        return np.array([list(row) for row in rows]).T

    def start_positions(self) -> np.ndarray:
        """[2, 2] (x, y) of player 1 and player 2."""
        found = {c: (x, y) for y, row in enumerate(self.grid) for x, c in enumerate(row) if c in "12"}
        return np.array([found["1"], found["2"]], np.int32)

    def recipe_time(self, onions: int, tomatoes: int) -> int:
        if self.onion_time and self.tomato_time:
            return self.onion_time * onions + self.tomato_time * tomatoes
        return 20

    def recipe_base_value(self, onions: int, tomatoes: int) -> int:
        if self.onion_value and self.tomato_value:
            return self.onion_value * onions + self.tomato_value * tomatoes
        return 20

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """[4, 4] delivery value and cook time indexed [onions, tomatoes]: a recipe outside `all_orders`
        is worth 0, a bonus order `order_bonus` times its value."""
        value = np.zeros((MAX_INGREDIENTS + 1,) * 2, np.int32)
        time = np.zeros((MAX_INGREDIENTS + 1,) * 2, np.int32)
        for o in range(MAX_INGREDIENTS + 1):
            for t in range(MAX_INGREDIENTS + 1 - o):
                time[o, t] = self.recipe_time(o, t)
                if (o, t) in self.all_orders:
                    bonus = self.order_bonus if (o, t) in self.bonus_orders else 1
                    value[o, t] = bonus * self.recipe_base_value(o, t)
        return value, time


THREE_ONIONS = ((3, 0),)

LAYOUTS = {
    layout.name: layout
    for layout in (
        Layout(
            "cramped_room",
            (
                "XXPXX",
                "O  2O",
                "X1  X",
                "XDXSX",
            ),
            THREE_ONIONS,
        ),
        Layout(
            "asymmetric_advantages",
            (
                "XXXXXXXXX",
                "O XSXOX S",
                "X   P 1 X",
                "X2  P   X",
                "XXXDXDXXX",
            ),
            THREE_ONIONS,
        ),
        Layout(
            "coordination_ring",
            (
                "XXXPX",
                "X 1 P",
                "D2X X",
                "O   X",
                "XOSXX",
            ),
            THREE_ONIONS,
        ),
        Layout(
            "forced_coordination",
            (
                "XXXPX",
                "O X1P",
                "O2X X",
                "D X X",
                "XXXSX",
            ),
            THREE_ONIONS,
        ),
        Layout(
            "counter_circuit",
            (
                "XXXPDPXXX",
                "X   2   X",
                "X XXXXX X",
                "X   1   X",
                "XXXOSTXXX",
            ),
            all_orders=((1, 2), (2, 1), (1, 1)),
            bonus_orders=((1, 1),),
            onion_value=21,
            tomato_value=13,
            onion_time=15,
            tomato_time=7,
        ),
        # The onion-only counter circuit of Carroll et al. 2019 (JaxMARL's "counter_circuit").
        Layout(
            "counter_circuit_o_1order",
            (
                "XXXPPXXX",
                "X  2   X",
                "D XXXX S",
                "X  1   X",
                "XXXOOXXX",
            ),
            THREE_ONIONS,
        ),
    )
}
