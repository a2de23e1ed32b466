"""Stand-in for torchvision (see ../../README.md).

``ops.roi_align`` and ``ops.masks_to_boxes`` are real (plain PyTorch). Every other
``torchvision.*`` module that timm or sam3 imports is synthesised on import: its attributes are
placeholder classes that raise when used, so importing works and using them fails loudly.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0-stub"


def _placeholder(qualname):
    def fail(*args, **kwargs):
        raise NotImplementedError(f"torchvision stub: {qualname} is not available in the parity oracle")

    return type(qualname.rsplit(".", 1)[-1], (), {"__init__": fail, "__call__": fail, "__new__": fail})


class _SyntheticModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(__name__ + "."):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return None  # a real file of this stub package exists: let it load
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _SyntheticModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Finder())

from . import ops  # noqa: E402,F401
