"""Validation of YAML-sourced settings with errors that name the file and the field at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from schemas.errors import ConfigError, MissingInputError

ModelT = TypeVar("ModelT", bound=BaseModel)


def validated(model: type[ModelT], data: Any, source: str) -> ModelT:
    """``model`` from ``data``; a ``ConfigError`` ``"SOURCE: field.path: message"`` for the first problem."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ConfigError(f"{source}: {where}: {err['msg']}") from None


def read_input_text(path: Path | str, what: str) -> str:
    """The text of a file the user named; a ``MissingInputError`` naming ``what`` it is when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist or is not a file")
    return path.read_text()
