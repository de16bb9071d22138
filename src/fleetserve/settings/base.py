"""The settings machinery: one pydantic-settings model per process kind, and the flags, FLEETSERVE_* variables
and config-file keys all generated from it.

A field is declared once, with its type, default and description. From it come: the command-line flag
(``--field-name``; ``flag=`` overrides), its ``--help`` text with the default, the environment variable
(``FLEETSERVE_FIELD_NAME``) and the config-file key (``field_name``, at the file's top level or under the
command's section). Precedence is pydantic-settings': flags given on the command line, then variables, then
the file's section for the command, then the file's top level, then the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fleetserve.errors import InvalidRequestError

ENV_PREFIX = "FLEETSERVE_"
COMMANDS = ("generate", "worker", "gateway", "up", "node", "bench", "models", "nodes")
"""Config-file sections: a key under one of these applies to that command only."""


def option(default: Any, help: str, *, flag: str | None = None, secret: bool = False, **kwargs: Any) -> Any:
    """A settings field: its default, its help text, and optionally its flag name (default: --field-name).

    ``secret`` fields (keys, tokens) are passed to child processes in the environment, never in arguments.
    """
    extra = {"flag": flag, "secret": secret}
    if "default_factory" in kwargs:
        return Field(description=help, json_schema_extra=extra, **kwargs)
    return Field(default, description=help, json_schema_extra=extra, **kwargs)


def read_config_file(path: str) -> dict:
    """A YAML (or JSON) config file as a mapping; a clear error when it cannot be read or is not a mapping."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise InvalidRequestError(f"cannot read config file {path}: {exc.strerror}", "config") from None
    except yaml.YAMLError as exc:
        raise InvalidRequestError(f"config file {path} is not valid YAML: {exc}", "config") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"config file {path} must hold a mapping of option names to values", "config")
    return data


class ConfigFileSource(PydanticBaseSettingsSource):
    """The config file's values for one command: its section over the file's top level.

    Top-level keys may belong to other commands and are taken only where this command has them; a key in the
    command's own section that it does not have is an error naming the valid ones.
    """

    def __init__(self, settings_cls: type[BaseSettings], data: dict, command: str):
        super().__init__(settings_cls)
        known = set(settings_cls.model_fields)
        section = data.get(command) or {}
        if not isinstance(section, dict):
            raise InvalidRequestError(f"config section {command!r} must be a mapping", "config")
        unknown = sorted(set(section) - known)
        if unknown:
            raise InvalidRequestError(
                f"unknown option(s) {', '.join(unknown)} in the config file's section {command!r}; "
                f"valid: {', '.join(sorted(known))}",
                "config",
            )
        top = {k: v for k, v in data.items() if k in known and k not in COMMANDS}
        self.values = {**top, **section}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class Settings(BaseSettings):
    """Base of every process kind's settings."""

    # Lists come from variables comma-separated and mappings as JSON: decoded by _from_text, not the library.
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", enable_decoding=False)
    command: ClassVar[str] = ""
    """The config-file section (and subcommand) these settings belong to."""
    _file: ClassVar[dict] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _from_text(cls, value: Any, info) -> Any:
        """A list given as one string (an environment variable) is comma-separated; a mapping is JSON."""
        if not isinstance(value, str):
            return value
        annotation = cls.model_fields[info.field_name].annotation
        if _is_list(annotation):
            return [part.strip() for part in value.split(",") if part.strip()]
        if _allows_dict(annotation) and value.lstrip().startswith("{"):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(settings_cls, cls._file, cls.command)

    @classmethod
    def load(cls, flags: dict[str, Any] | None = None, config_file: str | None = None):
        """Build and validate: ``flags`` (the options typed on the command line) over FLEETSERVE_* variables
        over ``config_file``. A bad value or an unknown key raises InvalidRequestError naming the key."""
        cls._file = read_config_file(config_file) if config_file else {}
        try:
            return cls(**(flags or {}))
        except ValidationError as exc:
            raise InvalidRequestError(_describe(exc), "config") from None
        finally:
            cls._file = {}

    @classmethod
    def given(cls, flags: dict[str, Any], config_file: str | None = None) -> set[str]:
        """The settings given on purpose: typed ``flags``, FLEETSERVE_* variables, and the keys of the config
        file's own section for the command (its top-level keys reach child processes through the file)."""
        fields = set(cls.model_fields)
        given = set(flags) | {name for name in fields if ENV_PREFIX + name.upper() in os.environ}
        if config_file:
            given |= set(read_config_file(config_file).get(cls.command) or {}) & fields
        return given

    def explicit_env(self, fields: typing.Iterable[str]) -> dict[str, str]:
        """FLEETSERVE_* variables that give these settings' values of ``fields``, for a child process that reads
        the same settings."""
        out = {}
        for name in fields:
            value = getattr(self, name)
            if isinstance(value, list):
                text = ",".join(str(v) for v in value)
            elif isinstance(value, dict):
                text = json.dumps(value)
            elif value is None:
                continue
            else:
                text = str(value)
            out[ENV_PREFIX + name.upper()] = text
        return out


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown option {where!r}")
        elif not err["loc"]:  # a check across fields: its message names the option
            parts.append(err["msg"].removeprefix("Value error, "))
        else:
            parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "bad settings: " + "; ".join(parts)


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), len(args) < len(typing.get_args(annotation))
    return annotation, False


def _allows_dict(annotation: Any) -> bool:
    return any(typing.get_origin(a) is dict or a is dict for a in typing.get_args(annotation) or (annotation,))


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(_unwrap(annotation)[0]) is list


def add_flags(parser: argparse.ArgumentParser, settings_cls: type[Settings], group: str | None = None) -> None:
    """One flag per field of ``settings_cls``, with its help and default; defaults stay out of the namespace
    (argparse.SUPPRESS) so that only typed flags override the variables and the file."""
    target = parser.add_argument_group(group) if group else parser
    for name, info in settings_cls.model_fields.items():
        extra = info.json_schema_extra or {}
        flag = extra.get("flag") or "--" + name.replace("_", "-")
        kind, _ = _unwrap(info.annotation)
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, "", []) else f" (default: {default})"
        text = ((info.description or "") + shown).replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_list(info.annotation):
            kwargs["action"] = "append"
        elif kind in (int, float):
            kwargs["type"] = kind
        target.add_argument(flag, **kwargs)


def flags_of(args: argparse.Namespace, settings_cls: type[Settings]) -> dict[str, Any]:
    """The fields of ``settings_cls`` that were typed on the command line."""
    return {k: v for k, v in vars(args).items() if k in settings_cls.model_fields}


def config_path(path: str | None) -> str | None:
    """The config file named by --config or FLEETSERVE_CONFIG."""
    path = path or os.environ.get(ENV_PREFIX + "CONFIG")
    return str(Path(path)) if path else None


def dial_host(host: str) -> str:
    """An address processes on this machine can dial for a listening host (a wildcard listens on loopback too)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
