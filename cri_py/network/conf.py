"""CNI network configuration discovery.

The kubelet keeps pods off a node until the runtime says NetworkReady, and the
network add-on usually drops its config into conf_dir after the runtime started.
So the config is looked up again whenever asked, and cached against the directory's
listing (names, sizes, mtimes): a new or edited file is seen at the next call, with
no restart and no polling timer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

CONF_EXTENSIONS = (".conf", ".conflist", ".json")


class NetworkNotReady(Exception):
    """No usable CNI config; the message says what is missing."""


@dataclass(frozen=True)
class NetworkConfig:
    """One CNI network as a conflist, whatever form its file had."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: str
    raw: dict[str, Any] = field(compare=False)

    def conflist_bytes(self) -> bytes:
        """The network as conflist JSON, as plugins expect on stdin."""
        return json.dumps(self.raw).encode()


def _as_conflist(path: str, data: Any) -> dict[str, Any]:
    """Validate a .conf/.conflist document and return it in conflist form."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "plugins" not in data:
        # a single-plugin .conf: wrap it the way libcni's ConfListFromConf does
        if not data.get("type"):
            raise ValueError("no plugins and no type")
        data = {"cniVersion": data.get("cniVersion", ""), "name": data.get("name", ""), "plugins": [data]}
    plugins = data["plugins"]
    if not isinstance(plugins, list) or not plugins:
        raise ValueError("plugins is empty")
    for plugin in plugins:
        if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not plugin["type"]:
            raise ValueError("a plugin has no type")
    if not data.get("name"):
        raise ValueError("no name")
    if not data.get("cniVersion"):
        raise ValueError("no cniVersion")
    return data


def find_plugin(plugin_type: str, bin_dirs: list[str]) -> str | None:
    """The path of a plugin binary in the first bin dir that has it."""
    if "/" in plugin_type:
        return None
    for directory in bin_dirs:
        path = os.path.join(directory, plugin_type)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class NetworkConfigSource:
    """The first usable network config of a directory, in file name order."""

    def __init__(self, conf_dir: str, bin_dirs: list[str]) -> None:
        self.conf_dir = conf_dir
        self.bin_dirs = bin_dirs
        self._key: tuple[Any, ...] | None = None
        self._result: NetworkConfig | NetworkNotReady | None = None

    def _listing(self) -> tuple[tuple[str, int, int], ...]:
        """Names, sizes and mtimes of candidate files: the cache key."""
        entries = []
        try:
            names = sorted(os.listdir(self.conf_dir))
        except FileNotFoundError:
            return ()
        for name in names:
            if not name.endswith(CONF_EXTENSIONS):
                continue
            try:
                st = os.stat(os.path.join(self.conf_dir, name))
            except FileNotFoundError:
                continue
            entries.append((name, st.st_size, st.st_mtime_ns))
        return tuple(entries)

    def _load(self, listing: tuple[tuple[str, int, int], ...]) -> NetworkConfig | NetworkNotReady:
        """Parse files in order; the first valid one wins, as libcni's ConfFiles does."""
        problems: list[str] = []
        for name, _, _ in listing:
            path = os.path.join(self.conf_dir, name)
            try:
                with open(path, "rb") as fh:
                    data = _as_conflist(path, json.loads(fh.read()))
            except (OSError, ValueError) as exc:
                problems.append(f"{name}: {exc}")
                continue
            missing = [p["type"] for p in data["plugins"] if find_plugin(p["type"], self.bin_dirs) is None]
            if missing:
                return NetworkNotReady(
                    f"cni config {path}: plugin {', '.join(missing)} not found in {', '.join(self.bin_dirs)}"
                )
            return NetworkConfig(
                name=data["name"], cni_version=data["cniVersion"], plugins=data["plugins"], source=path, raw=data
            )
        detail = f" ({'; '.join(problems)})" if problems else ""
        return NetworkNotReady(f"no valid network config found in {self.conf_dir}{detail}")

    def get(self) -> NetworkConfig:
        """The network to use now, or NetworkNotReady saying why there is none."""
        listing = self._listing()
        key = (listing, tuple(self.bin_dirs))
        # a failure is not cached: a plugin binary installed later has no conf_dir trace
        if key != self._key or not isinstance(self._result, NetworkConfig):
            self._result = self._load(listing)
            self._key = key
        if isinstance(self._result, NetworkNotReady):
            raise self._result
        return self._result
