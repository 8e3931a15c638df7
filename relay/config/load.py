"""Loading a config file: YAML with the line of every key, ``${ENV}`` and ``*_file`` secrets, validation.

Loading happens in three steps, each with its own reason:

1. YAML is parsed with a loader that remembers the line of every mapping key, so any error
   can name ``file:line: key``.
2. ``${ENV}`` references are substituted in every string and every ``*_file`` key is replaced
   by the content of the file it names; secrets are never required inline.
3. pydantic validates the result (``extra="forbid"``: a misspelt key is an error, not a silently
   ignored setting) and the cross-references (users → channels → accounts) are checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from relay.config.schema import SECRETS_WITHHELD, Config, CrossReferenceError


class ConfigError(Exception):
    """A configuration problem, already phrased for the operator (``file:line: key: why``)."""



class _LineDict(dict):
    """A mapping that knows the YAML line (1-based) of each of its keys."""

    lines: dict[Any, int]


class _LineLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):  # noqa: D102 - PyYAML hook
        mapping = _LineDict(super().construct_mapping(node, deep=True))
        mapping.lines = {
            self.construct_object(key_node, deep=True): key_node.start_mark.line + 1
            for key_node, _ in node.value
        }
        return mapping


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _LineLoader.construct_mapping
)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _line_of(data: Any, loc: tuple) -> tuple[int | None, str]:
    """Deepest known line for a key path, and the path as dotted text."""
    line = None
    node = data
    for part in loc:
        if isinstance(node, _LineDict) and part in node:
            line = node.lines.get(part, line)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            break
    return line, ".".join(str(part) for part in loc)


def _resolve_secrets(node: Any, path: tuple, source: str, root: Any, base: Path) -> Any:
    """Substitute ``${ENV}`` and replace ``key_file: PATH`` by ``key: <file content>``."""
    if isinstance(node, str):

        def env(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(_where(source, root, path, f"environment variable {name} is not set"))
            return os.environ[name]

        return _ENV_REF.sub(env, node)
    if isinstance(node, list):
        return [_resolve_secrets(item, path + (i,), source, root, base) for i, item in enumerate(node)]
    if isinstance(node, dict):
        resolved = _LineDict()
        resolved.lines = dict(getattr(node, "lines", {}))
        for key, value in node.items():
            value = _resolve_secrets(value, path + (key,), source, root, base)
            if isinstance(key, str) and key.endswith("_file") and key != "ca_file":
                target = key[: -len("_file")]
                if target in node:
                    raise ConfigError(_where(source, root, path + (key,), f"set {target} or {key}, not both"))
                file = base / str(value)
                try:
                    value = file.read_text().rstrip("\r\n")
                except OSError as error:
                    raise ConfigError(_where(source, root, path + (key,), f"cannot read {file}: {error.strerror}")) from None
                resolved.lines[target] = resolved.lines.get(key)
                key = target
            resolved[key] = value
        return resolved
    return node


def _where(source: str, root: Any, loc: tuple, message: str) -> str:
    line, dotted = _line_of(root, loc)
    position = f"{source}:{line}" if line else source
    return f"{position}: {dotted}: {message}" if dotted else f"{position}: {message}"


# What commands that only read the spool never need, so never resolve: ${ENV} unset or a
# *_file unreadable there must not stop `queue list` on a host without the secrets.
_SECRET_KEYS = ("api_key", "api_key_file", "password_hash", "password_hash_file", "api_keys", "token", "token_file")


def _minus(node: Any, keys: tuple[str, ...]) -> Any:
    """A mapping without ``keys``, its line numbers kept (anything else as it is)."""
    if not isinstance(node, dict):
        return node
    kept = _LineDict((key, value) for key, value in node.items() if key not in keys)
    kept.lines = dict(getattr(node, "lines", {}))
    return kept


def _without_secrets(raw: dict) -> dict:
    """The raw config minus the api_keys, password hashes, DKIM keys and admin token."""
    stripped = _minus(raw, ("dkim",))
    for section in ("accounts", "users"):
        if isinstance(raw.get(section), dict):
            entries = _minus(raw[section], ())
            for name, entry in raw[section].items():
                entries[name] = _minus(entry, _SECRET_KEYS)
            stripped[section] = entries
    if "admin" in raw:
        stripped["admin"] = _minus(raw["admin"], _SECRET_KEYS)
    return stripped


def _sections(text: str, source: str) -> dict:
    """The file's top-level mapping, each key's line kept."""
    try:
        raw = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}{line}: not valid YAML: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    return raw


def parse_config(text: str, source: str = "<config>", base: Path | None = None, secrets: bool = True) -> Config:
    """Validate YAML text into a :class:`Config`; raise :class:`ConfigError` naming file and line.

    ``secrets=False`` (commands that only read the spool) leaves out the api_keys, password
    hashes, DKIM keys and the admin token, without resolving their ``${ENV}`` or files.
    """
    raw = _sections(text, source)
    if not secrets:
        raw = _without_secrets(raw)
    data = _resolve_secrets(raw, (), source, raw, base or Path.cwd())
    try:
        return Config.model_validate(data, context={SECRETS_WITHHELD: not secrets})
    except ValidationError as error:
        raise ConfigError(_problems(error, source, data)) from None
    except CrossReferenceError as error:
        raise ConfigError(_where(source, data, error.loc, error.message)) from None


def _problems(error: ValidationError, source: str, data: Any, prefix: tuple = ()) -> str:
    problems = []
    for item in error.errors():
        loc = prefix + tuple(part for part in item["loc"] if not str(part).startswith("function-"))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (misspelt, or not supported by this version)"
        problems.append(_where(source, data, loc, message))
    return "\n".join(problems)


def load_section(path: Path | str, name: str) -> BaseModel:
    """Only the section ``name`` (``spool``, ``admin``: one model of the schema), validated alone.

    For commands that read nothing else: `reload` must reach the relay when the rest of the file
    is exactly what is broken (the running relay is the one to judge it), and the spool's
    commands start faster by building and validating one small model, not the whole schema.
    """
    path = Path(path)
    model = Config.model_fields[name].annotation
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    raw = _sections(text, str(path))
    data = _resolve_secrets(raw.get(name) or {}, (name,), str(path), raw, path.parent)
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_problems(error, str(path), raw, (name,))) from None


def load_config(path: Path | str, secrets: bool = True) -> Config:
    """Read and validate a config file; ``*_file`` paths are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    return parse_config(text, source=str(path), base=path.parent, secrets=secrets)


def load_demo_config() -> Config:
    """The embedded demo config (`relay/demo.yaml`): what `serve` runs without ``-c``."""
    from importlib import resources

    text = resources.files("relay").joinpath("demo.yaml").read_text()
    return parse_config(text, source="<embedded demo.yaml>")
