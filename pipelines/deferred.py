"""Modules that a library imports and a run never uses, left unloaded until something reads them.

`defer("scipy.stats")` puts a stand-in module in sys.modules. An `import` of that name (or
`from scipy import stats`) gets the stand-in without running the module; the first attribute read on
it imports the real module (which then replaces the stand-in in sys.modules) and answers from it, so
code that does use the module works as before, only later. importlib's LazyLoader cannot do this on
Python 3.11: the import statement reads `__spec__` of a module already in sys.modules, which loads it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types

_lock = threading.RLock()


class Deferred(types.ModuleType):
    """The stand-in: its spec and file are the real module's; every other attribute is the real one's."""

    def __getattr__(self, attr: str):  # only for attributes the stand-in does not have itself
        with _lock:
            if sys.modules.get(self.__name__) is self:
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
        return getattr(real, attr)


def defer(*names: str) -> None:
    """Stand-ins for `names` that are neither imported yet nor missing (a missing one stays missing:
    its import fails as it would have)."""
    with _lock:
        for name in names:
            spec = None if name in sys.modules else importlib.util.find_spec(name)
            if spec is None:
                continue
            stand_in = Deferred(name)
            stand_in.__spec__, stand_in.__file__ = spec, spec.origin
            sys.modules[name] = stand_in
