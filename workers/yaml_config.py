"""Load a YAML file into a pydantic model with errors a person can act on:
the file, then every bad field by its dotted path, what is wrong, and what
was given (for an unknown field, the fields allowed there)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid (a user error)."""


def format_validation_error(source: str, what: str, model: type[BaseModel], exc: ValidationError):
    lines = [f"{source}: invalid {what} ({exc.error_count()} error(s)):"]
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or f"<{what}>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, err["loc"][:-1])
            msg = "unknown field" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"  - {loc}: {msg} (got {err.get('input')!r})")
    return "\n".join(lines)


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a list of models
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", None)
        if inner and not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            annotation = next(
                (a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None
            )
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def validate_mapping(
    model: type[_M], data: Any, *, source: str, what: str, error: type[ValueError] = ConfigError
) -> _M:
    """Validate parsed data; errors name `source` and each bad field."""
    if not isinstance(data, dict):
        raise error(f"{source}: a {what} must be a mapping of fields, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(format_validation_error(source, what, model, exc)) from None


def load_yaml(
    model: type[_M],
    path: str | os.PathLike[str],
    *,
    what: str,
    error: type[ValueError] = ConfigError,
) -> _M:
    """Read, parse and validate a YAML file as `model`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        raise error(f"{path}: {what} is empty")
    return validate_mapping(model, data, source=str(path), what=what, error=error)
