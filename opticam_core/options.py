"""Typed options, declared once: in the signature of the function that uses them.

A method or metric group declares each option as a keyword-only parameter whose annotation
carries its type and range (the aliases below) and whose default is the documented default.
`options_model` turns that signature into a pydantic model, which `explain`, `metrics.compute`
and the run config all validate through, so a bad value fails at the first check, naming its
field and what it allows, and never on a cluster node halfway through a run.

Numbers are strict about what they accept: `"100"` or `true` is not an iteration count, though
numpy scalars and, for floats, ints are.
"""

from __future__ import annotations

import inspect
import operator
import types
import typing
from typing import Annotated, Any, Callable, Literal, Mapping

import annotated_types as at
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    ValidationError,
    create_model,
)


def _number(value):
    if isinstance(value, (bool, str, bytes)) or value is None:
        return value  # left for pydantic to reject with its own message
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:  # numpy / torch scalars
        return value.item()
    return value


def _integer(value):
    value = _number(value)
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("Input should be a valid integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return operator.index(value)
    except TypeError:
        return value


def _real(value):
    value = _number(value)
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("Input should be a valid number")
    return value


def _sequence(value):
    """A scalar where a list is expected becomes a one-element list; arrays become lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value


Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_real)]
PositiveInt = Annotated[Int, at.Ge(1)]
NonNegativeInt = Annotated[Int, at.Ge(0)]
PositiveFloat = Annotated[Float, at.Gt(0)]
NonNegativeFloat = Annotated[Float, at.Ge(0)]
Fraction = Annotated[Float, at.Gt(0), at.Lt(1)]          # open interval (0, 1)
Probability = Annotated[Float, at.Ge(0), at.Le(1)]       # closed interval [0, 1]


def _strict_bool(value):
    if not isinstance(value, bool) and not (hasattr(value, "dtype") and str(value.dtype) == "bool"):
        raise ValueError("Input should be true or false")
    return bool(value)


Bool = Annotated[bool, BeforeValidator(_strict_bool)]


def ListOf(item) -> Any:
    """A list of `item`; a single value is accepted as a list of one."""
    return Annotated[tuple[item, ...], BeforeValidator(_sequence), at.MinLen(1)]


class OptionsError(ValueError):
    """Options that cannot run; the message names every bad field and what it allows."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


_CONFIG = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)


def options_model(fn: Callable, *, name: str, skip: tuple[str, ...] = ()) -> type[BaseModel]:
    """The pydantic model of `fn`'s keyword-only parameters (types from the annotations,
    defaults from the defaults). Every such parameter must be annotated and have a default."""
    hints = typing.get_type_hints(fn, include_extras=True)
    fields: dict[str, tuple[Any, Any]] = {}
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind != param.KEYWORD_ONLY or pname in skip:
            continue
        if pname not in hints or param.default is param.empty:
            raise TypeError(f"{fn.__qualname__}: option {pname!r} needs a type annotation and a default")
        fields[pname] = (hints[pname], param.default)
    return create_model(name, __config__=_CONFIG, **fields)


def _where(prefix: str, loc: tuple) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def problems(err: ValidationError, prefix: str, model: type[BaseModel] | None = None) -> list[str]:
    """One line per error: `prefix.field: what is wrong, got VALUE (allowed: …)`."""
    lines = []
    for e in err.errors(include_url=False):
        loc = tuple(x for x in e["loc"] if not (isinstance(x, str) and x.startswith(("function-", "tuple["))))
        where = _where(prefix, loc)
        if e["type"] == "extra_forbidden":
            owner = _walk(model, loc[:-1])[0] if model is not None else None
            valid = ", ".join(owner.model_fields) if _is_model(owner) else "see the documentation"
            lines.append(f"{where}: unknown field; allowed: {valid or 'none'}")
            continue
        if e["type"] == "missing":
            lines.append(f"{where}: is required")
            continue
        msg = e["msg"].removeprefix("Value error, ").split(", got ")[0]
        annotation, metadata = _walk(model, loc) if model is not None else (None, ())
        kind = describe(annotation, metadata) if annotation is not None else "string"
        allowed = f" (allowed: {kind})" if kind != "string" else ""  # a string's rule is in the message
        lines.append(f"{where}: {msg}, got {e.get('input')!r}{allowed}")
    return lines


def _is_model(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _unwrap(annotation, metadata=()):
    """Annotated[X, …] and Optional[X] → X (with the Annotated metadata kept)."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = typing.get_args(annotation)
            metadata = tuple(metadata) + tuple(extra)
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation, metadata
            annotation = args[0]
        else:
            return annotation, metadata


def _walk(model: type[BaseModel], loc: tuple) -> tuple[Any, tuple]:
    """The annotation (and its metadata) at `loc` inside `model`; (None, ()) if it cannot be followed."""
    annotation, metadata = model, ()
    for part in loc:
        base, _ = _unwrap(annotation)
        if _is_model(base) and isinstance(part, str) and part in base.model_fields:
            field = base.model_fields[part]
            annotation, metadata = field.annotation, tuple(field.metadata)
            continue
        origin, args = typing.get_origin(base), typing.get_args(base)
        if isinstance(part, int) and origin in (list, tuple) and args:
            annotation, metadata = args[0], ()
        elif origin is dict and len(args) == 2:
            annotation, metadata = args[1], ()
        else:
            return None, ()
    return annotation, metadata


def validate(model: type[BaseModel], options: Mapping | None, prefix: str) -> BaseModel:
    """`options` checked against `model`; OptionsError names every bad field under `prefix`."""
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise OptionsError([f"{prefix}: must be a mapping of options, got {type(options).__name__}"])
    try:
        return model.model_validate(dict(options))
    except ValidationError as err:
        raise OptionsError(problems(err, prefix, model)) from None


def as_kwargs(options: BaseModel) -> dict[str, Any]:
    """Validated options as keyword arguments (values as validated, tuples kept)."""
    return {k: getattr(options, k) for k in type(options).model_fields}


def as_json(options: BaseModel, *, given_only: bool = False) -> dict[str, Any]:
    """Validated options as plain JSON values: every option (defaults filled), or only those given."""
    return options.model_dump(mode="json", exclude_unset=given_only)


def defaults(model: type[BaseModel]) -> dict[str, Any]:
    return {k: f.default for k, f in model.model_fields.items()}


class Configurable:
    """What a registered method or metric group offers about its options (its `options` schema);
    errors name each option under `where` (the method's key, `metrics.<group>`)."""

    options: type[BaseModel]
    where: str

    def validate(self, options: Mapping | None, prefix: str | None = None) -> BaseModel:
        """Checked options; OptionsError names each bad one as `prefix.option`."""
        return validate(self.options, options, self.where if prefix is None else prefix)

    def kwargs(self, options: Mapping | None) -> dict[str, Any]:
        return as_kwargs(self.validate(options))

    def resolved(self, options: Mapping | None) -> dict[str, Any]:
        """Every option with its value (defaults filled in), as JSON values."""
        return as_json(self.validate(options))

    def defaults(self) -> dict[str, Any]:
        return defaults(self.options)

    def option_types(self) -> dict[str, str]:
        return {k: describe(f.annotation, f.metadata) for k, f in self.options.model_fields.items()}


# ------------------------------------------------------------------------------------------
# Human-readable types, for error messages and option listings


def describe(annotation, metadata=()) -> str:
    """`integer ≥ 1`, `number in (0, 1)`, `one of 'mask', 'diff'`, `null or …`, `list of …`."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extra = typing.get_args(annotation)
        return describe(base, tuple(metadata) + tuple(extra))
    bounds = _bounds(metadata)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " or ".join(describe(a) for a in args)
        return f"null or {inner}" if len(args) < len(typing.get_args(annotation)) else inner
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {describe(args[0])}"
        return "[" + ", ".join(describe(a) for a in args) + "]"
    names = {int: "integer", float: "number", bool: "true or false", str: "string"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation))) + bounds


def _bounds(metadata) -> str:
    lo = hi = None
    for m in metadata:
        if isinstance(m, at.Gt):
            lo = f"({m.gt}"
        elif isinstance(m, at.Ge):
            lo = f"[{m.ge}"
        elif isinstance(m, at.Lt):
            hi = f"{m.lt})"
        elif isinstance(m, at.Le):
            hi = f"{m.le}]"
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" {'>' if lo[0] == '(' else '≥'} {lo[1:]}"
    if hi:
        return f" {'<' if hi[-1] == ')' else '≤'} {hi[:-1]}"
    return ""


__all__ = [
    "Bool", "Configurable", "Float", "Fraction", "Int", "ListOf", "NonNegativeFloat", "NonNegativeInt", "OptionsError",
    "PositiveFloat", "PositiveInt", "Probability", "as_json", "as_kwargs", "defaults", "describe",
    "options_model", "problems", "validate",
]
