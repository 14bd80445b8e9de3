"""`Choice`: the type of every setting that takes one of a fixed set of names (the ground floor: imports nothing
from koala, so every module may import it).

A choice is a str-valued Enum whose members are named by their values (`mse = auto()` is `"mse"`), defined next to
the code that uses it. In a schema field, OmegaConf and Hydra accept a member by its name at compose time and reject
anything else naming the valid members. A member is a `str` that compares, hashes, prints, formats and serialises
(json, OmegaConf YAML) as its value, so the plain strings of a saved config equal it. Called on a plain string
(`FeatureLoss("mse")`) the Enum converts it, or raises a ValueError naming the valid choices: the one check that
library functions called without a config use.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class Choice(str, Enum):
    """Base of every choice Enum; subclass with `name = auto()` members, or `Choice("Name", [names])`."""

    @staticmethod
    def _generate_next_value_(name: str, start: int, count: int, last_values: list[Any]) -> str:
        return name  # the value is the name: OmegaConf converts strings by member name

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)  # messages and list reprs read `'mse'`, as the string a user typed

    @classmethod
    def _missing_(cls, value: object) -> Choice:
        raise ValueError(f"{value!r} is not a valid {cls.__name__}: expected one of {', '.join(cls)}")
