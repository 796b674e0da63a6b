"""Heavy optional dependencies (TFDS, Orbax, the Hugging Face hub, safetensors, tokenizers, mnist1d) are declared at
the top of the module that uses them, as `name = lazy.module("package")`, and imported the first time one of
their attributes is read. So `import jaxlmc` stays light (a call on one's own arrays never loads TFDS or Orbax),
while each dependency is still named where it is used, once."""
from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    """A stand-in for the module `name`: the first attribute read imports it; every read after that is the module's
    own attribute."""

    def __init__(self, name: str):
        super().__init__(name)
        self._lazy_module: types.ModuleType | None = None

    def _load(self) -> types.ModuleType:
        if self._lazy_module is None:
            self._lazy_module = importlib.import_module(self.__name__)
        return self._lazy_module

    def __getattr__(self, attribute: str):
        return getattr(self._load(), attribute)

    def __repr__(self) -> str:
        state = "imported" if self._lazy_module is not None else "not imported yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def module(name: str) -> LazyModule:
    """The module `name`, imported when first used."""
    return LazyModule(name)


def load(*modules: LazyModule) -> None:
    """Import `modules` now (a module whose import registers something, such as TFDS's text builders)."""
    for m in modules:
        m._load()
