"""The documented range of each field of a pydantic schema, read from the schema itself.

The table of ranges in docs/api.md is rendered from these (api.ranges), and the tests set every field
to each end of its range, so the table, the checks and the tests cannot drift apart. Imports no torch.
"""
from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


@dataclass(frozen=True)
class FieldRange:
    path: str  # "loss.beta"; a dict's key is written <group>
    kind: str  # int, float, bool, string, choice, object, map, list
    nullable: bool
    default: Any  # PydanticUndefined when the field is required
    default_text: str | None  # a default that follows other fields, said in words
    low: float | None = None
    low_open: bool = False  # gt rather than ge
    high: float | None = None
    high_open: bool = False
    choices: tuple = ()  # kind choice: every value it takes
    also: tuple = ()  # a number that also takes these ("auto")
    examples: tuple = ()  # values in range of a field whose range is said in words
    range_text: str | None = None
    meaning: str = ""

    @property
    def numeric(self) -> bool:
        return self.kind in ("int", "float")

    def samples(self) -> list:
        """Values in range: each end (the nearest number inside an open end) and one between; every choice."""
        if self.kind == "bool":
            return [False, True]
        if self.choices:
            return list(self.choices)
        if not self.numeric or self.low is None or self.high is None:
            return [*self.examples, *self.also]
        low = _inside(self.low, self.low_open, self.kind, up=True)
        high = _inside(self.high, self.high_open, self.kind, up=False)
        middle = (low + high) // 2 if self.kind == "int" else _middle(low, high)
        return list(dict.fromkeys([low, middle, high, *self.also]))

    def outside(self) -> list:
        """Numbers just past each end (and a bool, which is never a number)."""
        if not self.numeric:
            return []
        step = 1 if self.kind == "int" else 0
        out = [True]
        if self.low is not None:
            out.append(self.low if self.low_open else _past(self.low, step, down=True))
        if self.high is not None:
            out.append(self.high if self.high_open else _past(self.high, step, down=False))
        return out


def _inside(end: float, open_: bool, kind: str, up: bool) -> float:
    if not open_:
        return end
    if kind == "int":
        return end + 1 if up else end - 1
    # The smallest "round" number inside an open end: 1e-300 above 0, not a subnormal float32 cannot hold.
    return (end + max(abs(end) * 1e-9, 1e-300)) if up else end - max(abs(end) * 1e-9, 1e-300)


def _middle(low: float, high: float) -> float:
    if low > 0 and high / low > 1e3:  # ranges over orders of magnitude: the geometric middle
        return float(f"{(low * high) ** 0.5:.3g}")
    return float(f"{(low + high) / 2:.6g}")


def _past(end: float, step: int, down: bool) -> float:
    if step:
        return end - step if down else end + step
    delta = max(abs(end) * 1e-6, 1e-12)
    return end - delta if down else end + delta


def field_ranges(model: type[BaseModel], prefix: str = "") -> list[FieldRange]:
    """One FieldRange per field of `model`, and of the models nested in it (their paths prefixed)."""
    out = []
    for name, info in model.model_fields.items():
        out.extend(_ranges(prefix + name, info))
    return out


def _ranges(path: str, info: FieldInfo) -> list[FieldRange]:
    annotation, nullable = _strip_none(info.annotation)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    default = info.default_factory() if info.default_factory is not None else info.default
    row = dict(path=path, nullable=nullable, default=default, default_text=extra.get("default_text"),
               range_text=extra.get("range_text"), examples=tuple(extra.get("examples", ())),
               meaning=info.description or "")
    if _is_model(annotation):
        return [FieldRange(kind="object", **row), *field_ranges(annotation, path + ".")]
    if "choices" in extra:
        return [FieldRange(kind="choice", choices=tuple(extra["choices"]), **row)]
    if typing.get_origin(annotation) is dict:
        value = typing.get_args(annotation)[1]
        nested = field_ranges(value, path + ".<group>.") if _is_model(value) else []
        return [FieldRange(kind="map", **row), *nested]
    literals, rest = _split(annotation)
    if not rest:
        return [FieldRange(kind="choice", choices=literals, **row)]
    if len(rest) > 1:
        return [FieldRange(kind="string", **row)]
    base, constraints = rest[0], list(info.metadata)
    if typing.get_origin(base) is Annotated:
        base, *more = typing.get_args(base)
        constraints += [m for fi in more if isinstance(fi, FieldInfo) for m in fi.metadata]
    kind = "list" if typing.get_origin(base) is list else {int: "int", float: "float", bool: "bool", str: "string"}.get(
        base, "string")
    return [FieldRange(kind=kind, also=literals, **row, **_bounds(constraints))]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _strip_none(annotation: Any) -> tuple[Any, bool]:
    members = _members(annotation)
    args = [a for a in members if a is not type(None)]
    return (args[0] if len(args) == 1 else Union[tuple(args)]), len(args) < len(members)  # noqa: UP007


def _members(annotation: Any) -> tuple:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def _split(annotation: Any) -> tuple[tuple, list]:
    """(the values of its Literal members, and bool's two when it is one; its other members)."""
    literals: list = []
    rest = []
    for m in _members(annotation):
        if m is bool and len(_members(annotation)) > 1:
            literals += [False, True]
        elif typing.get_origin(m) is Literal:
            literals += list(typing.get_args(m))
        else:
            rest.append(m)
    return tuple(literals), rest


def _bounds(constraints: list) -> dict:
    out: dict = {}
    for c in constraints:
        if isinstance(c, at.Ge):
            out.update(low=c.ge, low_open=False)
        elif isinstance(c, at.Gt):
            out.update(low=c.gt, low_open=True)
        elif isinstance(c, at.Le):
            out.update(high=c.le, high_open=False)
        elif isinstance(c, at.Lt):
            out.update(high=c.lt, high_open=True)
    return out


def number(value: Any) -> str:
    """A number as the table writes it: 5e-6, 0.1, 65536."""
    if isinstance(value, bool) or value is None:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float):
        text = f"{value:g}"
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", text)
    return str(value)


def range_text(f: FieldRange) -> str:
    if f.range_text:
        text = f.range_text
    elif f.choices:
        text = ", ".join(number(c) if not isinstance(c, str) else c for c in f.choices)
    elif f.kind == "bool":
        text = "false, true"
    elif f.numeric and (f.low is not None or f.high is not None):
        low = "-inf" if f.low is None else number(f.low)
        high = "inf" if f.high is None else number(f.high)
        text = f"{'(' if f.low_open else '['}{low}, {high}{')' if f.high_open else ']'}"
    else:
        return "null" if f.nullable and f.kind in ("object", "map") else "-"
    alternatives = [*(str(a) for a in f.also), *(["null"] if f.nullable else [])]
    return f"{text}, or {' or '.join(alternatives)}" if alternatives else text


def default_text(f: FieldRange) -> str:
    if f.default_text:
        return f.default_text
    if f.default is PydanticUndefined:
        return "required"
    if isinstance(f.default, dict | list | BaseModel):
        return "{}" if f.default in ({}, []) else "see below"
    if isinstance(f.default, str):
        return f.default
    return number(f.default)
