"""Validation of YAML-sourced settings with errors that name the file and the field at fault."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from schemas.errors import ConfigError, MissingInputError

ModelT = TypeVar("ModelT", bound=BaseModel)
YAML_TAG_PREFIX = "tag:yaml.org,2002:"
DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
SIMPLE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# Every settings model: frozen, no unknown keys, and every float finite (NaN and infinities are refused,
# naming the field: a NaN threshold compares false with everything and silently disables its rule).
SETTINGS = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _yaml_where(source: str, exc: yaml.YAMLError) -> str:
    """``SOURCE, line L, column C`` for a YAML error with a position (lines and columns counted from 1)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source


def load_yaml(text: str, source: str) -> Any:
    """The data of a YAML document the user wrote (``yaml.safe_load``), or a ``ConfigError`` naming the
    file and line of what cannot be read: invalid YAML, a tag such as ``!!python/object`` (only plain
    YAML is read: mappings, lists, strings, numbers, booleans, null), or nesting too deep to walk."""
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        problem = exc.problem or ""
        tag = re.search(r"for the tag '([^']*)'", problem)
        if tag:
            name = tag.group(1).replace(YAML_TAG_PREFIX, "!!", 1)
            raise ConfigError(
                f"{_yaml_where(source, exc)}: unsupported YAML tag {name}: only plain YAML is read (mappings, "
                "lists, strings, numbers, booleans)"
            ) from exc
        raise ConfigError(f"{_yaml_where(source, exc)}: invalid YAML: {problem}") from exc
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{_yaml_where(source, exc)}: invalid YAML: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{source}: YAML nested too deeply to read; settings files are a few levels deep") from exc


def check_device(value: str) -> str:
    """A torch device the stages take: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not DEVICE.fullmatch(value):
        raise ValueError(f"device {value!r} is not one of auto, cpu, cuda, cuda:N")
    return value


def check_simple_name(value: str) -> str:
    """A name that is one path component: letters, digits, ``-``, ``_`` and ``.``, but not ``.`` or ``..``."""
    if not SIMPLE_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"name {value!r} must be a simple name: letters, digits, '-', '_' and '.', and not '.' or '..'"
        )
    return value


def check_model_reference(value: str) -> str:
    """A model given as a hub id or a folder; a path to a file is refused (it can hold no model)."""
    if Path(value).expanduser().is_file():
        raise ValueError(
            f"{value} is a file, not a model folder: give the folder of the model (with its config.json, or a "
            "pipeline folder with model_index.json) or a hub id"
        )
    return value


def require_model_folder(value: str, what: str) -> None:
    """When a model is written as a path (``/``, ``./``, ``../`` or ``~`` first, as ``pipeline_spec.model_path``
    reads it), its folder must exist by the time the stage runs (a spec's earlier stage may make it)."""
    if value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().is_dir():
        raise MissingInputError(f"{what} {value}: the model folder does not exist")


Device = Annotated[str, AfterValidator(check_device)]
SimpleName = Annotated[str, AfterValidator(check_simple_name)]
ModelReference = Annotated[str, AfterValidator(check_model_reference)]


SHOWN_ERRORS = 5  # problems a ConfigError names before "and N more"


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model an annotation holds (``X``, ``X | None``, ``list[X]``, ``tuple[X, ...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        if (found := model_in(arg)) is not None:
            return found
    return None


def nearest_key(model: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The key of ``model``'s settings at ``loc`` (an unknown key's path) closest to the key written there."""
    here: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list: the same model
            continue
        field = here.model_fields.get(part) if here is not None else None
        here = model_in(field.annotation) if field is not None else None
    if here is None or not isinstance(loc[-1], str):
        return None
    close = difflib.get_close_matches(loc[-1], list(here.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def _problem(model: type[BaseModel], err: Any) -> str:
    """``field.path: message``, with the key meant when the field is unknown and one is close."""
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    meant = nearest_key(model, tuple(err["loc"])) if err["type"] == "extra_forbidden" else None
    return f"{where}: {err['msg']}" + (f" (did you mean {meant}?)" if meant else "")


def validated(model: type[ModelT], data: Any, source: str) -> ModelT:
    """``model`` from ``data``; a ``ConfigError`` ``"SOURCE: field.path: message; ..."`` naming every problem
    (the first ``SHOWN_ERRORS``), an unknown key with the key meant when one is close."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(_problem(model, err) for err in errors[:SHOWN_ERRORS])
        more = f"; and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        raise ConfigError(f"{source}: {problems}{more}") from None


def read_input_text(path: Path | str, what: str) -> str:
    """The text of a file the user named; a ``MissingInputError`` naming ``what`` it is when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist or is not a file")
    try:
        return path.read_text()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not a text file ({exc.reason} at byte {exc.start})") from exc
    except PermissionError as exc:
        raise MissingInputError(f"{what} {path} cannot be read ({exc.strerror})") from exc
