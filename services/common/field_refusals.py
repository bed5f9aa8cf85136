"""A spec value refused by a rule of the platform, naming the spec field: the API answers it as a 422."""

from __future__ import annotations


class FieldRefused(ValueError):
    """`field` is where the spec names the value; `message` says the rule it broke."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
