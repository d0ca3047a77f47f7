"""The toolkit's extension points, one registry each: models and learning rules.

A registry maps a name to a builder and a one-line description. Builders register themselves
where they are defined (``@MODELS.register("cnn", "...")``), so adding a model or a learning rule
is one new file plus one registration; config validation, the CLI's choices and the training
loop all read the same registry. This module imports nothing of the package, so every builder
module can import it without cycles; ``ccl_repr/__init__.py`` imports the builder modules, which
fills the registries before any config is validated.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> (entry, description). Behaves as the sorted collection of its names, so it can
    be given as a config field's ``choices`` and is read when a value is validated, not when
    the field is defined."""

    def __init__(self, what: str, key: str) -> None:
        self.what, self.key = what, key  # e.g. "model", "model.name" (the config key naming it)
        self._entries: dict[str, tuple[T, str]] = {}

    def register(self, name: str, description: str) -> Callable[[T], T]:
        def deco(entry: T) -> T:
            if name in self._entries and self._entries[name][0] is not entry:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._entries[name] = (entry, description)
            return entry
        return deco

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ConfigError(f"{self.key}: unknown {self.what} {name!r}; choose one of {', '.join(self)}")
        return self._entries[name][0]

    def describe(self) -> dict[str, str]:
        return {k: self._entries[k][1] for k in self}

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self)})"


MODELS: Registry[Callable] = Registry("model", "model.name")
RULES: Registry[type] = Registry("learning rule", "method")
