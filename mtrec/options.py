"""Validating option dictionaries (``--model-args``, ``--balancer-args``) against pydantic configs.

Models and balancers each declare their options as a pydantic ``Config`` (``extra="forbid"``).
:func:`validate_options` is the one place an option dictionary becomes a config: any unknown,
mistyped or out-of-range option ends as one :class:`~mtrec.errors.MtrecError` line that names the
part, the option and what was wrong, and lists every option the part takes with its default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from mtrec.errors import MtrecError

C = TypeVar("C", bound=BaseModel)

# pydantic error types whose stock message is reworded (the option's value is shown before it)
_REWORDED = {
    "float_parsing": "is not a number",
    "float_type": "is not a number",
    "int_parsing": "is not a whole number",
    "int_type": "is not a whole number",
    "int_from_float": "is not a whole number",
    "finite_number": "is not finite",
    "bool_parsing": "is not true or false",
    "bool_type": "is not true or false",
}


def describe_options(config: type[BaseModel]) -> str:
    """``"name=default, ..."`` for every field of ``config`` (``name`` alone when it defaults to None)."""
    parts = []
    for name, field in config.model_fields.items():
        if field.default_factory is not None:
            default = field.default_factory()  # type: ignore[call-arg]
        else:
            default = field.default
        if default is PydanticUndefined or default is None:
            parts.append(name)
        else:
            parts.append(f"{name}={default}")
    return ", ".join(parts) if parts else "none"


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_errors(err: ValidationError) -> str:
    """Every problem of ``err`` on one line: ``no option typo``, ``alpha='x' is not a number``, ..."""
    parts = []
    for e in err.errors():
        loc = _location(tuple(e["loc"]))
        kind = e["type"]
        if kind == "extra_forbidden":
            parts.append(f"no option {loc}")
        elif kind == "value_error":  # our own validators: the message names the option itself
            parts.append(e["msg"].removeprefix("Value error, "))
        elif kind in _REWORDED:
            parts.append(f"{loc}={e['input']!r} {_REWORDED[kind]}")
        else:
            msg = e["msg"]
            msg = msg[:1].lower() + msg[1:]
            parts.append(f"{loc}={e['input']!r}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_options(config: type[C], options: Mapping[str, Any] | None, what: str, context: dict | None = None) -> C:
    """``options`` as a ``config``; ``what`` (e.g. ``"model 'mmoe'"``) starts the error message."""
    try:
        return config.model_validate(dict(options or {}), context=context)
    except ValidationError as err:
        raise MtrecError(f"{what}: {describe_errors(err)}; its options: {describe_options(config)}") from None
