"""The aligner registry: names → Aligner classes (lazily imported), and loading a saved aligner.

    from pipeline.aligners.registry import get_aligner, load_aligner, register

Built-in aligners are registered by "module:Class" so that importing this stays instant; the module
(and torch) is imported the first time its name is resolved. Kept apart from the package's
__init__, which imports nothing, so that the aligner modules can import it without a cycle.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from pipeline.aligners.base import Aligner
from pipeline.errors import UserError

__all__ = ["Aligner", "get_aligner", "load_aligner", "register", "registered_names"]

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")  # an absolute module name, or a class's qualname

_REGISTRY: dict[str, type | str] = {
    "procrustes": "pipeline.aligners.procrustes:Procrustes",
    "procrustes-affine": "pipeline.aligners.procrustes:ProcrustesAffine",
    "linear": "pipeline.aligners.adapters:Linear",
    "affine": "pipeline.aligners.adapters:Affine",
    "lora": "pipeline.aligners.adapters:LoRA",
    "projection": "pipeline.aligners.projection:LearnedProjection",
}


def _path(entry: type | str) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"


def register(name: str):
    """Class decorator: make an Aligner subclass available as `name` (xmodel fit NAME)."""

    def decorate(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Aligner)):
            raise TypeError(f"@register({name!r}) needs an Aligner subclass, got {cls!r}")
        current = _REGISTRY.get(name)
        # the same class may register again (built-in placeholder, module reload); another may not
        if current is not None and _path(current) != _path(cls):
            raise ValueError(f"aligner name {name!r} is already registered to {_path(current)}")
        _REGISTRY[name] = cls
        cls.kind = name
        return cls

    return decorate


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def get_aligner(name_or_path: str) -> type[Aligner]:
    """The Aligner class for a registered name or a `module:Class` import path."""
    entry = _REGISTRY.get(name_or_path)
    if entry is None and ":" not in name_or_path:
        raise UserError(f"unknown aligner {name_or_path!r}: registered are {', '.join(registered_names())}, "
                        "or give an import path module:Class")
    if entry is None or isinstance(entry, str):
        cls = _import(entry or name_or_path)
        if entry is not None:  # importing the module ran its @register; keep the class itself
            _REGISTRY[name_or_path] = cls
        return cls
    return entry


def _import(path: str) -> type[Aligner]:
    module_name, _, qualname = path.partition(":")
    if not _DOTTED.fullmatch(module_name) or not _DOTTED.fullmatch(qualname):
        raise UserError(f"aligner {path!r} is not an absolute import path: give module:Class with dotted names and "
                        "no leading dot, e.g. mypkg.aligners:MyAligner")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"aligner {path!r}: cannot import module {module_name!r} ({e})") from None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise UserError(f"aligner {path!r}: module {module_name!r} has no {qualname!r}")
    if not (isinstance(obj, type) and issubclass(obj, Aligner)):
        raise UserError(f"aligner {path!r} is not an Aligner subclass")
    return obj


def load_aligner(directory: Any, trust: str | None = None) -> Aligner:
    """Restore any saved aligner; its class comes from the kind recorded in aligner.json, which must be
    a registered name, a class already imported, or `trust` (a name from params or the command line):
    a user-editable file never makes xmodel import a module."""
    from pathlib import Path

    from pipeline.aligners.base import saved_config

    directory = Path(directory)
    return resolve_saved_kind(saved_config(directory).get("kind", "?"), directory, trust).load(directory)


def resolve_saved_kind(kind: str, directory: Any, trust: str | None = None) -> type[Aligner]:
    """The class of a saved `kind`, without importing anything aligner.json alone names."""
    import sys

    from pipeline.aligners.base import CONFIG

    if kind in _REGISTRY or kind == trust:
        return get_aligner(kind)
    module, _, _ = kind.partition(":")
    if ":" in kind and module in sys.modules:  # the caller imported it: the class is already there
        return get_aligner(kind)
    raise UserError(f"{directory / CONFIG} names kind {kind!r}, which is neither a registered aligner nor a class "
                    "already imported, and aligner.json alone never decides what is imported: name it in "
                    f"fit.aligners (or pass it to xmodel fit), or register it")
