"""One registry style for every named thing gendd looks up: methods, students, evaluation profiles, datasets,
mode-discovery algorithms, memory evictions.

A :class:`Registry` is a read-only mapping from names to entries with one lookup error that lists the names.
Built-in entries come from a function called on first use, so importing a module changes no registry;
``register`` adds an entry at run time (a user's own student or method)::

    STUDENTS = Registry("student", _builtin_students)
    STUDENTS.get("convnet3")          # the entry, or ConfigError "unknown student 'x'; choose one of: ..."
    STUDENTS.register("mynet", build_mynet)
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, Mapping, TypeVar

from gendd.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one ``kind``; ``builtins()`` returns the built-in ``{name: entry}`` (called once)."""

    def __init__(self, kind: str, builtins: Callable[[], Mapping[str, T]]) -> None:
        self.kind = kind
        self._builtins = builtins
        self._entries: dict[str, T] | None = None

    def _all(self) -> dict[str, T]:
        if self._entries is None:
            self._entries = dict(self._builtins())
        return self._entries

    def get(self, name: str) -> T:
        """The entry registered as ``name``; ConfigError listing the names otherwise."""
        entries = self._all()
        if name not in entries:
            raise ConfigError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return entries[name]

    def names(self) -> list[str]:
        return sorted(self._all())

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` as ``name``; a name already taken is a ConfigError. Returns the entry."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {self.kind} needs a non-empty name, got {name!r}")
        entries = self._all()
        if name in entries:
            raise ConfigError(f"{self.kind} {name!r} is registered already; pick another name")
        entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._all())

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._all()[n]) for n in self.names()]

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
