"""One registry type behind every extension point (model kinds, datasets, label maps, optimisers, pair measures,
checkpoint loaders, study stages): entries by name, in the order they were registered.

    OPTIMIZERS.register("lion", factory)          a name already taken is refused
    OPTIMIZERS.lookup("adamw")                    an unknown name is refused with the closest registered ones
    with OPTIMIZERS.registered("lion", factory):  registered inside the block only (a test's, or a notebook's)
    OPTIMIZERS.names()                            the registered names, sorted

A registry is a dict (reading it by name, iterating, `in`) that remembers what it holds, so that its errors name it.
"""
from __future__ import annotations

import contextlib
import difflib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Named entries of one kind (`what`: "model kind", "optimizer", … — the words its errors use)."""

    def __init__(self, what: str, entries: dict[str, T] | None = None):
        super().__init__(entries or {})
        self.what = what

    def register(self, name: str, value: T, after: str | None = None) -> T:
        """Add `value` under `name` (at the end, or right after the entry `after`); returns it. ValueError when
        `name` is taken or `after` is not registered."""
        if name in self:
            raise ValueError(f"{self.what} {name!r} is already registered")
        if after is None:
            self[name] = value
            return value
        if after not in self:
            raise ValueError(f"{self.what} {name!r}: after={after!r} is not registered ({', '.join(self)})")
        entries = list(self.items())
        position = [key for key, _ in entries].index(after) + 1
        self.clear()
        self.update([*entries[:position], (name, value), *entries[position:]])
        return value

    def unregister(self, name: str) -> T:
        """Remove `name` (KeyError when it is not registered); returns what it held."""
        return self.pop(name)

    @contextlib.contextmanager
    def registered(self, name: str, value: T, after: str | None = None) -> Iterator[T]:
        """`register` for the duration of a `with` block: gone again when it ends, however it ends."""
        self.register(name, value, after)
        try:
            yield value
        finally:
            self.pop(name, None)

    def lookup(self, name: str) -> T:
        """The entry `name`; ValueError naming the closest registered names when there is none."""
        if name in self:
            return self[name]
        raise ValueError(self.unknown(name))

    def unknown(self, name: str) -> str:
        """The one-line message for a name that is not registered: what is, the closest first."""
        close = difflib.get_close_matches(str(name), list(self), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        return f"{self.what} {name!r} is not registered (registered: {', '.join(self.names())}){hint}"

    def names(self) -> list[str]:
        return sorted(self)

    def copy(self) -> Registry[T]:
        return Registry(self.what, dict(self))

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self)})"
