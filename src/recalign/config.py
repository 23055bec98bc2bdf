"""Configs: a method's defaults < YAML file < `--set key=value` overrides, validated against the defaults.

Keys are dotted paths into nested dicts (`train.epochs`). An unknown key is an error listing the valid
keys; a value of the wrong type is an error naming the key, the expected and the given type.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from recalign.errors import InputError

BASE_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {
        "format": None,  # reader for a path dataset (`recalign data formats`); None = detected from file names
        "like_threshold": None,  # rating > threshold is a positive; null = the format's own (3; Book-Crossing 5)
        "k_core_users": 0,
        "k_core_items": 0,
        "domain": None,  # noun used in prompts ("movie", "book", ...); None = the dataset's own
    },
}


# keys whose default is null but whose value, when given, has a type: dotted key -> example value
# (each method declares its own sections' keys in `Method.nullable`)
# prompt.system: null = the chat template's own default system message (where a method has that key)
BASE_NULLABLE: dict[str, Any] = {"data.like_threshold": 0.0, "data.format": "", "data.domain": "", "prompt.system": ""}


def check_seed(seed, key: str = "seed", top: int = 2**32 - 1) -> None:
    """A random seed numpy accepts: an integer in 0..top."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= top:
        raise InputError(f"{key}: expected an integer in 0..{top}, got {seed!r}")


def check_base(config: dict) -> None:
    """The keys every method has."""
    check_seed(config["seed"])
    data = config["data"]
    for key in ("k_core_users", "k_core_items"):
        if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < 0:
            raise InputError(f"data.{key}: expected an integer >= 0, got {data[key]!r}")


def flatten(tree: dict, prefix: str = "", leaves: set[str] | None = None) -> dict[str, Any]:
    """Dotted keys of a nested mapping; a key in `leaves` (a mapping-valued setting) is not descended into."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not (leaves and path in leaves):
            out.update(flatten(value, path + ".", leaves))
        else:
            out[path] = value
    return out


def merge_defaults(*trees: dict) -> dict:
    out: dict = {}
    for tree in trees:
        _deep_update(out, copy.deepcopy(tree))
    return out


def _deep_update(target: dict, source: dict) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise InputError(f"--set {item!r}: expected key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise InputError(f"--set {item!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


class _Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2's plain scalars where PyYAML follows YAML 1.1: floats without a dot (`1e-4`,
    `5E3`) are numbers, not strings (`--set train.lr=1e-4` would be refused as "not a number"), and only
    true/false are booleans, not yes/no/on/off (`prompt.yes: Yes` is the answer text, `yes:` a key)."""


_BOOL = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


class _UniqueKeyLoader(_Loader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise InputError(f"{path}: {'not a regular file' if path.exists() else 'config file not found'}")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: a config file must be a mapping of keys to values")
    return data


_KIND = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}


def _check_type(key: str, default: Any, value: Any, where: str, may_be_null: bool = False) -> Any:
    if default is None:
        return value
    if value is None:
        if may_be_null:
            return value
        raise InputError(f"{where}: key '{key}' cannot be null; it expects {_KIND.get(type(default), 'a value')}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise InputError(f"{where}: key '{key}' expects true/false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: key '{key}' expects an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: key '{key}' expects a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise InputError(f"{where}: key '{key}' expects a string, got {value!r}")
        return value
    if isinstance(default, list):
        if not isinstance(value, list):
            raise InputError(f"{where}: key '{key}' expects a list, got {value!r}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise InputError(f"{where}: key '{key}' expects a mapping, got {value!r}")
        return value
    return value


def resolve(defaults: dict, file: str | Path | None = None, sets: list[str] | None = None,
            nullable: dict[str, Any] | None = None, moved: dict[str, str] | None = None) -> dict:
    """defaults < file < sets, every key checked against `defaults` (null only where the default is null or
    the key is in `nullable`).

    nullable: dotted keys whose default is null -> an example value of the type they take when set.
    moved: old dotted key -> new key; using the old one is an error that names the new one."""
    nullable = {**BASE_NULLABLE, **(nullable or {})}
    moved = moved or {}
    config = copy.deepcopy(defaults)
    valid = flatten(defaults)
    layers: list[tuple[str, dict[str, Any]]] = []
    if file:
        layers.append((str(file), flatten(load_yaml(file), leaves=set(valid))))
    if sets:
        layers.append(("--set", flatten(dict(parse_set(item) for item in sets), leaves=set(valid))))
    for where, flat in layers:
        for key, value in flat.items():
            if key in moved:
                raise InputError(f"{where}: config key '{key}' is now '{moved[key]}'")
            if key not in valid:
                prefix_matches = [k for k in valid if k.startswith(key + ".")]
                if prefix_matches and isinstance(value, dict) and not value:
                    continue
                if prefix_matches:
                    raise InputError(f"{where}: '{key}' is a section and expects a mapping of its keys "
                                     f"({', '.join(sorted(prefix_matches)[:6])}{', ...' if len(prefix_matches) > 6 else ''}), "
                                     f"got {value!r}")
                raise InputError(
                    f"{where}: unknown config key '{key}'; valid keys: {', '.join(sorted(valid))}"
                )
            default = valid[key] if valid[key] is not None else nullable.get(key)
            _set(config, key, _check_type(key, default, value, where, may_be_null=valid[key] is None or key in nullable))
    return config


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for part in parts[:-1]:
        tree = tree.setdefault(part, {})
    tree[parts[-1]] = value


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
