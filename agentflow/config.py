"""Configuration loading: YAML files plus dotted ``key=value`` overrides, bound to frozen dataclasses.

OmegaConf parses the YAML and the dotted overrides and merges them (later wins). The result is
bound to a dataclass tree by :func:`build`, which checks every key and type against the
dataclasses' annotations and then runs their own validation, collecting *every* problem into one
:class:`ConfigError` (unknown keys come with a "did you mean" hint). :func:`describe` lists every
field with its type, default and the line of the class docstring that documents it; the CLI's
``--help`` prints it.

Not here: what the fields mean (each dataclass documents its own) or how objects are built from
them (the training recipe does that).
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from agentflow.errors import ConfigError

__all__ = ["build", "describe", "load_config", "merge_sources", "to_dict"]

T = TypeVar("T")


def merge_sources(paths: Sequence[str | pathlib.Path] = (), overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Merge YAML files and ``a.b.c=value`` overrides (YAML-typed values) into one plain dict."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    parts = [_load_yaml(pathlib.Path(p)) for p in paths]
    bad = [o for o in overrides if "=" not in o or not o.split("=", 1)[0].strip()]
    if bad:
        raise ConfigError([f"override {o!r} is not of the form key.path=value" for o in bad])
    try:
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*parts) if parts else OmegaConf.create({})
        out = OmegaConf.to_container(merged, resolve=True)
    except (OmegaConfBaseException, TypeError) as e:
        raise ConfigError(f"cannot merge the configuration: {e}") from e
    if not isinstance(out, dict):
        raise ConfigError(f"the configuration must be a mapping at the top level, got {type(out).__name__}")
    return out


def _load_yaml(path: pathlib.Path) -> Any:
    """One YAML file as an OmegaConf mapping; a message naming the file for anything else."""
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; expected a YAML file path")
    try:
        loaded = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as e:
        where = " ".join(str(e).split())
        raise ConfigError(f"cannot parse {str(path)!r} as YAML: {where}") from e
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{str(path)!r} holds a YAML {type(loaded).__name__.removesuffix('Config').lower()} at "
                          "the top level; expected a mapping of sections (model:, data:, trainer:, ...)")
    return loaded


def load_config(cls: type[T], paths: Sequence[str | pathlib.Path] = (), overrides: Sequence[str] = ()) -> T:
    """``build(cls, merge_sources(paths, overrides))``."""
    return build(cls, merge_sources(paths, overrides))


def build(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Bind ``data`` to the dataclass ``cls`` (recursively); raise one ConfigError listing all problems."""
    problems: list[str] = []
    obj = _build_dataclass(cls, data or {}, "", problems)
    if problems:
        raise ConfigError(problems)
    return typing.cast(T, obj)


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain data (for saving next to a run)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------------------------- binding
def _build_dataclass(cls: type, data: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(data, Mapping):
        problems.append(f"{path or '<root>'}: expected a mapping of {cls.__name__} fields, got {data!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(str(key), fields, n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(sorted(fields))}"
            problems.append(f"{_join(path, key)}: unknown key{extra}")
    kwargs = {}
    n_before = len(problems)
    for name in fields:
        if name in data:
            value = data[name]
            default = _field_default(fields[name])
            if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
                # a nested section starts from the parent's default for it (which may differ from
                # the section class's own defaults), so one override does not reset its siblings
                value = _merged(_init_values(default), value)
            kwargs[name] = _coerce(hints[name], value, _join(path, name), problems)
    if len(problems) > n_before:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.extend(_prefixed(p, path) for p in e.problems)
    except (TypeError, ValueError) as e:
        problems.append(f"{path or '<root>'}: {e}")
    return None


def _field_default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _init_values(obj: Any) -> dict[str, Any]:
    """A dataclass instance's constructor arguments, nested dataclasses as dicts."""
    return {f.name: _init_values(v) if dataclasses.is_dataclass(v := getattr(obj, f.name)) else v
            for f in dataclasses.fields(obj) if f.init}


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(out.get(k), Mapping) and isinstance(v, Mapping) else v
    return out


def _prefixed(problem: str, path: str) -> str:
    return problem if not path or problem.startswith(path) else f"{path}: {problem}"


def _coerce(tp: Any, value: Any, path: str, problems: list[str]) -> Any:  # noqa: C901  (one branch per kind)
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for opt in options:
            trial: list[str] = []
            out = _coerce(opt, value, path, trial)
            if not trial:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        if value not in args:
            problems.append(f"{path}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if not isinstance(value, list | tuple):
            problems.append(f"{path}: expected a list, got {value!r}")
            return None
        item_t = args[0] if args else Any
        items = [_coerce(item_t, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: expected a mapping, got {value!r}")
            return None
        return dict(value)
    return _coerce_scalar(tp, value, path, problems)


def _coerce_scalar(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    problems.append(f"{path}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return None


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return re.sub(r"typing\.|<class '([^']+)'>", r"\1", str(tp))


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


# ---------------------------------------------------------------------------------------- help
def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """Every leaf field as ``(dotted name, type, default, doc line)``, nested dataclasses expanded
    (with the defaults their parent gives them, ``defaults`` for this level when nested)."""
    rows = []
    docs = _attribute_docs(cls)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        name = _join(prefix, f.name)
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, name, default if dataclasses.is_dataclass(default) else None))
            continue
        shown = "<required>" if default is dataclasses.MISSING else repr(to_dict(default))
        rows.append((name, _type_name(tp), shown, docs.get(f.name, "")))
    return rows


def _attribute_docs(cls: type) -> dict[str, str]:
    """Parse the ``Attributes:`` section of a Google-style class docstring."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    in_attrs = False
    current: list[str] = []
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_attrs = True
            continue
        if not in_attrs:
            continue
        m = re.match(r"^([\w, ]+):\s*(.*)$", stripped)
        if m and line.startswith(" " * 8) and not line.startswith(" " * 12):
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                out[n] = m.group(2)
        elif stripped and current:
            for n in current:
                out[n] = (out[n] + " " + stripped).strip()
    return out
