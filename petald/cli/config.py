"""Configuration: flags > environment (``PETALD_<OPTION>``) > TOML file > built-in defaults.

The file (``--config PATH``, else ``$PETALD_CONFIG``, else ``$XDG_CONFIG_HOME/petald/config.toml``,
else ``~/.config/petald/config.toml``) holds option names as keys: top-level keys apply to
every command that has that option, a ``[serve]`` (``[generate]``, ...) table to one command
and wins over the top level. The environment variable of ``--initial-peers`` is
``PETALD_INITIAL_PEERS`` for every command; lists are separated by spaces or commas.

Environment and file values become click's ``default_map``, so a flag on the command line
always wins, and click converts and checks every value as if it were typed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

ENV_PREFIX = "PETALD_"
NOT_CONFIGURABLE = {"help", "debug", "verbose", "args", "prompt", "version"}
NOT_CONFIGURABLE_COMMANDS = {"install-service", "config"}
SECRET_OPTIONS = {"api_key"}  # `config show` says where they are set, never what they are


class ConfigError(click.ClickException):
    """A config file that cannot be used, said in a sentence."""


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "petald" / "config.toml"


def config_path(given: str | None) -> tuple[Path, bool]:
    """The file to read and whether the user named it (then it must exist)."""
    if given:
        return Path(given).expanduser(), True
    if os.environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(os.environ[f"{ENV_PREFIX}CONFIG"]).expanduser(), True
    return default_config_path(), False


def read_config_file(path: Path, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ConfigError(f"the config file {path} does not exist")
        return {}
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class Setting:
    value: Any
    origin: str  # "env PETALD_X", "file PATH", "file PATH [serve]"


def option_key(option: click.Option) -> str:
    """The option's name in files and the environment: its long flag, ``--initial-peers`` ->
    ``initial_peers`` (``--daemon/--no-daemon`` -> ``daemon``)."""
    flag = next((o for o in option.opts if o.startswith("--")), option.opts[0])
    return flag.lstrip("-").replace("-", "_")


def _options(command: click.Command) -> dict[str, click.Option]:
    """Configurable options by key."""
    return {option_key(p): p for p in command.params
            if isinstance(p, click.Option) and p.name and p.name not in NOT_CONFIGURABLE}


def configurable_commands(group: click.Group) -> dict[str, click.Command]:
    """The commands whose options a file or the environment may set (not one-off tools such as
    install-service, whose generic option names would collide in the environment)."""
    return {name: command for name, command in sorted(group.commands.items())
            if name not in NOT_CONFIGURABLE_COMMANDS and not isinstance(command, click.Group)
            and _options(command)}


def _from_text(option: click.Option, text: str) -> Any:
    """An environment value as click would want it in ``default_map``."""
    if option.multiple:
        return [part for part in text.replace(",", " ").split() if part]
    return text


def _checked(option: click.Option, value: Any, where: str) -> Any:
    """``value`` as the option's type reads it, or a sentence naming where it came from (the
    environment variable): click would name only the flag, which the person never typed. A file's
    values are checked by click (its refusal names the flag, as the file's keys do)."""
    try:
        for one in value if option.multiple else [value]:
            option.type.convert(one, option, None)
    except click.BadParameter as exc:
        raise ConfigError(f"{where}: {exc.message}") from None
    return value


def _from_file(option: click.Option, value: Any, where: str) -> Any:
    if option.multiple:
        if isinstance(value, str):
            return [part for part in value.replace(",", " ").split() if part]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {option_key(option)} must be a list")
        return [str(v) for v in value]
    if isinstance(value, dict | list):
        raise ConfigError(f"{where}: {option_key(option)} must be a single value")
    return value


def resolve_settings(group: click.Group, file: dict[str, Any], path: Path,
                     environ: dict[str, str] | None = None) -> dict[str, dict[str, Setting]]:
    """Per command, every option set by the environment or the file, with where it came from."""
    environ = dict(os.environ if environ is None else environ)
    commands = configurable_commands(group)
    known = {name for command in commands.values() for name in _options(command)}
    tables = {key for key, value in file.items() if isinstance(value, dict)}
    top = {key.replace("-", "_"): value for key, value in file.items() if key not in tables}
    for key in top:
        if key not in known:
            raise ConfigError(f"{path}: {key!r} is not an option of any petald command")
    for table in tables:
        if table not in commands:
            raise ConfigError(f"{path}: [{table}] is not a petald command (commands: {', '.join(commands)})")
    result: dict[str, dict[str, Setting]] = {}
    for name, command in commands.items():
        options = _options(command)
        own = {k.replace("-", "_"): v for k, v in file.get(name, {}).items()}
        for key in own:
            if key not in options:
                raise ConfigError(f"{path}: [{name}] {key!r} is not an option of petald {name}")
        settings: dict[str, Setting] = {}
        for option_name, option in options.items():
            env_name = f"{ENV_PREFIX}{option_name.upper()}"
            if env_name in environ:
                value = _checked(option, _from_text(option, environ[env_name]), f"{env_name}={environ[env_name]!r}")
                settings[option_name] = Setting(value, f"env {env_name}")
            elif option_name in own:
                where = f"{path} [{name}]"
                settings[option_name] = Setting(_from_file(option, own[option_name], where), f"file {where}")
            elif option_name in top:
                settings[option_name] = Setting(_from_file(option, top[option_name], str(path)), f"file {path}")
        result[name] = settings
    return result


def default_map(group: click.Group, settings: dict[str, dict[str, Setting]]) -> dict[str, Any]:
    """click's ``default_map``: per command, parameter name -> value."""
    commands = configurable_commands(group)
    out: dict[str, Any] = {}
    for name, values in settings.items():
        options = _options(commands[name])
        out[name] = {options[key].name: setting.value for key, setting in values.items()}
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def describe_effective(group: click.Group, settings: dict[str, dict[str, Setting]], path: Path,
                       exists: bool, only: str | None = None) -> str:
    """The effective configuration as TOML, each value with where it came from."""
    lines = [f"# config file: {path}" + ("" if exists else " (not present)"),
             f"# precedence: flags > environment ({ENV_PREFIX}<OPTION>) > config file > defaults", ""]
    for name, command in configurable_commands(group).items():
        if only is not None and name != only:
            continue
        lines.append(f"[{name}]")
        for option_name, option in _options(command).items():
            setting = settings.get(name, {}).get(option_name)
            if setting is not None:
                value, origin = setting.value, setting.origin
            else:
                value, origin = option.default, "default"
                if callable(value):
                    value = value()
                if not isinstance(value, str | int | float | bool | list | tuple):
                    # click's "no default" marker; an on/off pair without a default is "not set"
                    value = False if option.is_flag and not option.secondary_opts else None
            if option.multiple and value is not None:
                value = list(value)
            if option_name in SECRET_OPTIONS and value is not None:
                value = "(set; not shown)"
            if value is None or value == [] or value == ():
                lines.append(f"# {option_name} = (not set)")
            else:
                lines.append(f"{option_name} = {_toml_value(value)}  # {origin}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
