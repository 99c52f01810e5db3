"""Named choices (modes, kinds) as string enums: typed in code, plain strings in JSON and on the CLI."""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

from .errors import InputError

E = TypeVar("E", bound="TextEnum")


class TextEnum(str, Enum):
    """A choice among fixed words; compares equal to its word and prints as it."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def words(cls) -> tuple[str, ...]:
        """The accepted words, in declaration order."""
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls: type[E], value: object, what: str, error: type[Exception] = InputError) -> E:
        """``value`` as a member, or ``error`` naming ``what`` and the accepted words."""
        try:
            return cls(value)
        except ValueError:
            raise error(f"unknown {what} {value!r}; use one of {', '.join(cls.words())}") from None
