"""Name -> class registries: one registered class per kind of a thing (the shape of timm's ``register_model`` and
peft's ``register_peft_method``).

Each kind of thing enecg lets users extend (expert families, gate inputs, task types, training strategies) has one
:class:`Registry`; a new kind is one class with a ``name`` and the registry's decorator, in one new file::

    @register_gate
    class MyGate(GateRouter):
        name = "my_gate"
        ...

Nothing else changes: configs validate names against the registry, and builders look classes up in it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes of one kind by their ``name`` class attribute.

    Args:
        kind: what the classes are, for error messages (e.g. ``"gate input"``).
        builtins: module imported before the first lookup, where the built-in classes register themselves (lets a
            registry live in a base module that its built-ins import, without an import cycle).
        key: the class attribute holding the registered name (``name`` unless instances use ``name`` otherwise).
    """

    def __init__(self, kind: str, *, builtins: str | None = None, key: str = "name") -> None:
        self.kind = kind
        self.key = key
        self._builtins = builtins
        self._classes: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` available under its name (class attribute :attr:`key`); a second class
        under one name is refused."""
        name = getattr(cls, self.key, None)
        if not isinstance(name, str) or not name:
            raise ValueError(f"{cls.__name__} needs a class attribute `{self.key}` to be registered as a {self.kind}")
        if name in self._classes and self._classes[name] is not cls:
            raise ValueError(f"a {self.kind} named {name!r} is already registered ({self._classes[name].__name__})")
        self._classes[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Remove ``name`` (tests that register a toy class clean up with this)."""
        self._classes.pop(name, None)

    def get(self, name: str) -> T:
        """The class registered as ``name``; one line naming the known ones otherwise."""
        self._load_builtins()
        try:
            return self._classes[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._classes)

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def _load_builtins(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None
            importlib.import_module(module)

