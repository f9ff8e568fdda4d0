"""One config layer: a plain config mapping -> a frozen settings dataclass, typed by its annotations.

Every settings dataclass of fcas (``TCDMSettings``, ``CALSettings``, ``MGMConfig``, ``ExportSettings``, ...) is
read from a plain mapping -- a resolved Hydra config, a checkpoint's ``config.json``, a test's dict -- by
:func:`build`:

* the mapping may be a ``dict``, an OmegaConf ``DictConfig`` (resolved first) or ``None`` (the defaults);
* unknown keys are refused (``ValueError`` naming the dataclass, the unknown keys and the known ones); the keys
  in ``ignore`` (e.g. Hydra's own ``hydra``) are dropped first;
* each value is converted by its field's annotation (``typing.get_type_hints``): a nested dataclass is built
  from a nested mapping (``None``: read from ``{}``; a missing key keeps the field's default),
  ``tuple[int, int, int]`` / ``tuple[float, ...]`` from a list, a lone string for ``tuple[str, ...]`` is a
  one-tuple (``splits=test``), a mapping for a tuple of pairs is read as its items, ``X | None`` and other
  unions take the first member that fits, ``int`` / ``float`` / ``str`` / ``bool`` are checked (numbers
  written as strings are read); ``Any``, ``dict``, ``Mapping`` and other types are left as they are. A wrong
  value names its key with the nested path (``train.steps must be an int, got 'abc'``);
* the dataclass's own ``__post_init__`` checks then run as usual.

A class whose reading genuinely differs (a default that differs when read from a config, spellings of
"none") defines a classmethod ``before_build(cls, d: dict) -> dict``: it gets a copy of the plain mapping and
returns the one to read; :func:`build` calls it for nested fields too.

Why hand-written: OmegaConf's structured configs do not handle our frozen dataclasses (tuple fields, unions
such as ``str | tuple[str, ...]``, ``__post_init__`` checks that normalise values), and fcas/ outside
fcas/pipeline/ stays free of Hydra; so one small typed builder lives here instead of a "refuse unknown keys"
copy in every settings module.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
import os
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar, Union

from omegaconf import OmegaConf

__all__ = ["build"]

T = TypeVar("T")
HOOK = "before_build"   # the optional classmethod of a settings dataclass: (cls, d: dict) -> dict


def build(cls: type[T], mapping: Mapping[str, Any] | None = None, *, where: str | None = None,
          what: str | None = None, ignore: Iterable[str] = ()) -> T:
    """``cls`` (a dataclass) from ``mapping`` (dict, OmegaConf ``DictConfig`` or None = defaults).

    ``where``: the config path of ``mapping`` (``"mgm.qc"``), prefixed to every error; nested fields extend it.
    ``what``: how the unknown-key error names the mapping (default ``"<cls> keys"``).
    ``ignore``: keys dropped before anything is read (e.g. ``("hydra",)``).
    Raises ``ValueError`` for unknown keys, missing required ones and values of the wrong type.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"build needs a dataclass, got {cls!r}")
    d = _plain_mapping(mapping, where or cls.__name__)
    for key in ignore:
        d.pop(key, None)
    hook = getattr(cls, HOOK, None)
    if hook is not None:
        d = dict(hook(d))
    params = {f.name: f for f in dataclasses.fields(cls) if f.init}
    loc = f"{where}: " if where else ""
    unknown = sorted(set(d) - set(params), key=str)
    if unknown:
        label = f"{what} {unknown} ({cls.__name__})" if what else f"{cls.__name__} keys {unknown}"
        raise ValueError(f"{loc}unknown {label}; known: {sorted(params)}")
    missing = [n for n, f in params.items() if n not in d
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{loc}missing {cls.__name__} keys {missing}")
    hints = _hints(cls)
    return cls(**{k: _convert(hints.get(k, Any), v, _join(where, k)) for k, v in d.items()})


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _plain_mapping(mapping, where: str) -> dict:
    if mapping is None:
        return {}
    if OmegaConf.is_config(mapping):
        mapping = OmegaConf.to_container(mapping, resolve=True)
    if not isinstance(mapping, Mapping):
        raise ValueError(f"{where} must be a mapping, got {mapping!r}")
    return dict(mapping)


def _join(path: str | None, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _is_sequence(v) -> bool:
    """A list-like value (list, tuple, ListConfig, array); not a string or a mapping."""
    return hasattr(v, "__len__") and hasattr(v, "__iter__") and not isinstance(v, (str, bytes, Mapping))


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(tp, v, path: str):
    """``v`` as annotation ``tp`` says (see the module docstring); ``ValueError`` naming ``path`` if it is not."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _convert_union(typing.get_args(tp), v, path)
    if _is_dataclass_type(tp):
        if isinstance(v, tp):
            return v
        if v is not None and not isinstance(v, Mapping) and not OmegaConf.is_config(v):
            raise ValueError(f"{path} must be a mapping, got {v!r}")
        return build(tp, v, where=path)
    if origin is tuple or tp is tuple:
        return _convert_tuple(typing.get_args(tp), v, path)
    if tp is bool:
        return _to_bool(v, path)
    if tp in (int, float):
        return _to_number(tp, v, path)
    if tp is str:
        return _to_str(v, path)
    return v   # Any, dict, Mapping, callables, other classes: as they are


def _convert_union(args: tuple, v, path: str):
    if v is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    errors = []
    for a in members:
        try:
            return _convert(a, v, path)
        except ValueError as err:
            errors.append((a, err))
    fitting = [err for a, err in errors if _same_shape(a, v)]
    if len(errors) == 1 or len(fitting) == 1:   # one candidate: its own (more precise) reason
        raise (errors[0][1] if len(errors) == 1 else fitting[0])
    raise ValueError(f"{path} must be {' or '.join(_describe(a) for a in members)}, got {v!r}")


def _same_shape(tp, v) -> bool:
    """Whether ``v`` is the kind of value ``tp`` takes (a list for a tuple, a mapping for a dataclass, ...)."""
    if typing.get_origin(tp) is tuple or tp is tuple:
        return _is_sequence(v) or isinstance(v, Mapping)
    if _is_dataclass_type(tp):
        return isinstance(v, Mapping)
    return not (_is_sequence(v) or isinstance(v, Mapping))


def _describe(tp) -> str:
    if typing.get_origin(tp) is tuple or tp is tuple:
        return "a list"
    if _is_dataclass_type(tp):
        return "a mapping"
    names = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _convert_tuple(args: tuple, v, path: str) -> tuple:
    if args == (str, Ellipsis) and isinstance(v, str):
        return (v,)   # splits=test: one split
    if isinstance(v, Mapping) and args and typing.get_origin(args[0]) is tuple:
        v = list(v.items())   # {name: value} for a tuple of (name, value) pairs
    if not _is_sequence(v):
        raise ValueError(f"{path} must be a list, got {v!r}")
    items = list(v)
    if not args:
        return tuple(items)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], x, f"{path}[{i}]") for i, x in enumerate(items))
    if len(items) != len(args):
        raise ValueError(f"{path} must hold {len(args)} items, got {v!r}")
    return tuple(_convert(a, x, f"{path}[{i}]") for i, (a, x) in enumerate(zip(args, items)))


def _to_bool(v, path: str) -> bool:
    if isinstance(v, bool):
        return v
    if str(getattr(v, "dtype", "")) == "bool":   # a numpy bool
        return bool(v)
    if isinstance(v, numbers.Integral) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    raise ValueError(f"{path} must be true or false, got {v!r}")


def _to_number(typ: type, v, path: str):
    """``int`` (an integral float too) or ``float``; a number written as a string is read; never a bool."""
    if typ is int:
        fits = isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())
    else:
        fits = isinstance(v, numbers.Real)
    if fits and not isinstance(v, bool):
        return typ(v)
    if isinstance(v, str):
        try:
            return typ(v.strip())
        except ValueError:
            pass
    raise ValueError(f"{path} must be {_describe(typ)}, got {v!r}")


def _to_str(v, path: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return str(v)   # name=2024 on the command line
    raise ValueError(f"{path} must be a string, got {v!r}")
