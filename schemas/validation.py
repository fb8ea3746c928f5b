"""Validation of YAML-sourced settings with errors that name the file and the field at fault."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

ModelT = TypeVar("ModelT", bound=BaseModel)


def validated(model: type[ModelT], data: Any, source: str) -> ModelT:
    """``model`` from ``data``; a ValueError ``"SOURCE: field.path: message"`` for the first problem."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise ValueError(f"{source}: {where}: {err['msg']}") from None
