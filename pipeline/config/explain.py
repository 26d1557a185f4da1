"""One-line messages for pydantic's validation errors: the key path, what was given, and what is accepted."""

from __future__ import annotations

import difflib
import json
from typing import Annotated, Any, Iterable, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    s = (repr(v) if isinstance(v, str)
         else json.dumps(v, default=str) if isinstance(v, (list, dict, bool, type(None))) else str(v))
    return s if len(s) <= 60 else s[:57] + "..."


def _unknown(key: str, prefix: str, accepted: Iterable[str], what: str = "key") -> str:
    accepted = list(accepted)
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?; " if close else ""
    return f"unknown {what} '{prefix}{key}' ({hint}accepted: {', '.join(accepted)})"


def _strip_optional(ann: Any) -> tuple[Any, bool]:
    if get_origin(ann) is Union or type(ann).__name__ == "UnionType":
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) < len(get_args(ann)) and len(args) == 1:
            return args[0], True
    return ann, False


def _unwrap(ann: Any) -> tuple[Any, list[Any]]:
    """Strip Annotated layers, collecting their constraint metadata."""
    meta: list[Any] = []
    while get_origin(ann) is Annotated:
        args = get_args(ann)
        ann = args[0]
        for m in args[1:]:
            meta.extend(getattr(m, "metadata", []) if isinstance(m, FieldInfo) else [m])
    return ann, meta


def _bounds(meta: Iterable[Any]) -> str:
    parts = {}
    for m in meta:
        for attr in ("gt", "ge", "lt", "le"):
            if isinstance(m, getattr(annotated_types, attr.capitalize())):
                parts[attr] = getattr(m, attr)
    lo = ("(", parts["gt"]) if "gt" in parts else ("[", parts["ge"]) if "ge" in parts else None
    hi = (")", parts["lt"]) if "lt" in parts else ("]", parts["le"]) if "le" in parts else None
    if lo and hi:
        return f" in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f" {'>' if lo[0] == '(' else '>='} {lo[1]}"
    if hi:
        return f" {'<' if hi[0] == ')' else '<='} {hi[1]}"
    return ""


def describe(ann: Any, field: FieldInfo | None = None) -> str:
    """Human description of what a field accepts, e.g. 'a number in (0, 1)' or 'one of eps, x0, v'."""
    ann, optional = _strip_optional(ann)
    ann, meta = _unwrap(ann)
    if field is not None:
        meta = list(field.metadata) + meta
    origin = get_origin(ann)
    if origin is Literal:
        desc = "one of " + ", ".join(str(a) for a in get_args(ann))
    elif ann is bool:
        desc = "true or false"
    elif ann is int:
        desc = "an integer" + _bounds(meta)
    elif ann is float:
        desc = "a number" + _bounds(meta)
    elif ann is str:
        desc = "a non-empty string" if any(getattr(m, "min_length", 0) for m in meta) else "a string"
        desc = field.description if field is not None and field.description else desc  # a pattern's words
    elif origin in (tuple, list):
        inner = get_args(ann)[0] if get_args(ann) else Any
        desc = f"a list of {describe(inner).replace('an integer', 'integers').replace('a number', 'numbers')}"
    elif isinstance(ann, type) and issubclass(ann, BaseModel):
        desc = "a mapping with keys " + ", ".join(ann.model_fields)
    else:
        desc = f"a valid {getattr(ann, '__name__', ann)}"
    return desc + (" or null" if optional else "")


def _field_at(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, FieldInfo | None, Any]:
    """Walk `loc` through nested models: (model holding the last key, its FieldInfo, annotation)."""
    holder: Any = model
    field = None
    ann: Any = None
    for part in loc:
        if (isinstance(holder, type) and issubclass(holder, BaseModel) and isinstance(part, str)
                and part in holder.model_fields):
            field = holder.model_fields[part]
            ann = field.annotation
            parent = holder
            holder, _ = _unwrap(_strip_optional(ann)[0])
        else:
            # list index / union branch name: stay on the same field
            continue
    return (parent if field is not None else None), field, ann


def _explain(e: ValidationError, model: type[BaseModel], section: str, data: Any) -> str:
    """The one-line message for pydantic's first error: the key path, what was given and what is accepted (one
    branch per kind of error pydantic reports)."""
    err = e.errors(include_url=False)[0]
    loc = tuple(err.get("loc", ()))
    typ = err.get("type", "")
    keys = [p for p in loc if isinstance(p, str)]
    path = ".".join([section] + [str(p) for p in loc])
    if typ == "extra_forbidden":
        holder: Any = model
        if len(loc) > 1:
            _, f, ann = _field_at(model, loc[:-1])
            holder, _ = _unwrap(_strip_optional(ann)[0]) if f is not None else (model, None)
        accepted = list(holder.model_fields) if isinstance(holder, type) and issubclass(holder, BaseModel) else []
        prefix = ".".join([section] + [str(p) for p in loc[:-1]]) + "."
        return _unknown(str(loc[-1]), prefix, accepted)
    if typ == "missing":
        return f"missing key '{path}' (every key is set in the params file: copy it from the repository's params.yaml)"
    # a cross-field rule (model_validator) reports at the model's own location
    parent, field, ann = _field_at(model, loc) if keys else (None, None, None)
    if field is None or typ == "value_error":
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        where = path if keys else section
        return f"{where}: {msg}"
    # value at loc
    value: Any = data
    for p in loc:
        try:
            value = value[p]
        except (KeyError, IndexError, TypeError):
            value = err.get("input")
            break
    got = f"got {_type_name(value)}" if isinstance(value, (dict, list)) else f"got {_show(value)}"
    if typ in ("literal_error", "enum") and isinstance(value, str):
        opts = [str(a) for a in get_args(_unwrap(_strip_optional(ann)[0])[0])]
        close = difflib.get_close_matches(value, opts, n=1, cutoff=0.6)
        if close:
            got += f" (did you mean '{close[0]}'?)"
    # report on the whole field, e.g. "prepare.test_fraction must be a number in (0, 1), got 1.5"
    field_path = ".".join([section] + [p for p in loc if isinstance(p, str)])
    if get_origin(_unwrap(_strip_optional(ann)[0])[0]) in (tuple, list) and any(isinstance(p, int) for p in loc):
        field_path = path
        inner_ann = get_args(_unwrap(_strip_optional(ann)[0])[0])[0]
        return f"{field_path} must be {describe(inner_ann)}, {got}"
    return f"{field_path} must be {describe(ann, field)}, {got}"
