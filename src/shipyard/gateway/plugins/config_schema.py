"""Small typed readers for plugin configs: each returns a clean value or raises PluginConfigError naming the field.

Plugins call these in __init__ so a bad config is refused at write time (admin API 400), never at request time.
"""

from __future__ import annotations

import builtins
import ipaddress
from collections.abc import Mapping
from typing import Any

from shipyard.gateway.plugins.base import PluginConfigError


class ConfigReader:
    """Reads fields of one plugin config; `finish()` refuses fields the plugin does not know."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        if not isinstance(config, Mapping):
            raise PluginConfigError("config must be an object")
        self.config = config
        self.seen: set[str] = set()

    def _get(self, name: str, default: Any) -> Any:
        self.seen.add(name)
        value = self.config.get(name, default)
        return default if value is None else value

    def bool(self, name: str, default: bool = False) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise PluginConfigError(f"{name}: expected a boolean")
        return value

    def int(self, name: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
        value = self._get(name, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise PluginConfigError(f"{name}: expected an integer")
        if minimum is not None and value < minimum:
            raise PluginConfigError(f"{name}: value must be greater than or equal to {minimum}")
        return int(value)

    def number(self, name: str, default: float = 0.0, *, minimum: float | None = None) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PluginConfigError(f"{name}: expected a number")
        if minimum is not None and value < minimum:
            raise PluginConfigError(f"{name}: value must be greater than or equal to {minimum}")
        return float(value)

    def str(self, name: str, default: str = "") -> str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise PluginConfigError(f"{name}: expected a string")
        return value

    # Below the methods named str, int and bool, those names are the methods: the types are spelt builtins.str.
    def choice(self, name: builtins.str, choices: tuple[builtins.str, ...], default: builtins.str) -> builtins.str:
        value = self.str(name, default)
        if value not in choices:
            raise PluginConfigError(f"{name}: expected one of: {', '.join(choices)}")
        return value

    def str_list(self, name: builtins.str, default: list[builtins.str] | None = None) -> list[builtins.str]:
        value = self._get(name, default or [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PluginConfigError(f"{name}: expected an array of strings")
        return list(value)

    def str_map(self, name: builtins.str) -> dict[builtins.str, builtins.str]:
        value = self._get(name, {})
        if not isinstance(value, Mapping) or not all(isinstance(v, str) for v in value.values()):
            raise PluginConfigError(f"{name}: expected an object of strings")
        return {str(k): v for k, v in value.items()}

    def record(self, name: builtins.str) -> ConfigReader:
        value = self._get(name, {})
        if not isinstance(value, Mapping):
            raise PluginConfigError(f"{name}: expected an object")
        return ConfigReader(value)

    def cidrs(self, name: builtins.str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        out = []
        for item in self.str_list(name):
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise PluginConfigError(f"{name}: invalid ip or cidr range: '{item}'") from None
        return out

    def finish(self) -> None:
        unknown = sorted(set(self.config) - self.seen)
        if unknown:
            raise PluginConfigError(f"{unknown[0]}: unknown field")


def name_value_pairs(items: list[str], field: str, *, need_value: bool = True) -> list[tuple[str, str]]:
    """Kong's "name:value" strings (value may contain ':')."""
    out = []
    for item in items:
        name, sep, value = item.partition(":")
        if not name or (need_value and not sep):
            raise PluginConfigError(f"{field}: invalid value '{item}' (expected name:value)")
        out.append((name.strip(), value.strip()))
    return out
