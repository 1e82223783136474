"""CNI plugin execution: ADD, DEL and CHECK of a network list, with a result cache.

CNI is an exec protocol: each plugin is a binary that reads its config as JSON on
stdin and its arguments from CNI_* environment variables. This module does what
libcni does for a conflist, with no Go in between:

- each plugin's config gets the list's `name` and `cniVersion`, the previous plugin's
  result as `prevResult` (ADD), and a `runtimeConfig` holding only the capability
  arguments the plugin declares in its `capabilities` map;
- ADD runs the plugins in order and chains their results; DEL runs them in reverse
  with the cached ADD result as `prevResult` (CNI >= 0.4.0); CHECK runs them in order
  with the cached result;
- the final ADD result is cached together with the exact network config and request
  used, so the pod is torn down with what set it up, even after a daemon restart and
  a change of conf_dir;
- an ADD that fails halfway is undone by a DEL of the whole chain before the error
  is raised, so no IP allocation, veth or port mapping leaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import os
import signal
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from cri_py import errors
from cri_py.network.conf import NetworkConfig, find_plugin
from cri_py.network.netns import netns_exists
from cri_py.atomicfile import atomic_write

CACHE_KIND = "cri-py/cni-cache/v1"
STDERR_LIMIT = 4000  # a plugin's stderr is quoted in errors, but a panic dump must not flood logs

T = TypeVar("T")


@dataclass
class CniRequest:
    """What one pod interface asks of the network: the CNI_* env and runtimeConfig inputs."""

    container_id: str
    netns: str
    ifname: str = "eth0"
    args: dict[str, str] = field(default_factory=dict)
    capability_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CniRequest:
        """Rebuild a request from its cached form."""
        return cls(
            container_id=data["container_id"],
            netns=data.get("netns", ""),
            ifname=data.get("ifname", "eth0"),
            args=dict(data.get("args") or {}),
            capability_args=dict(data.get("capability_args") or {}),
        )


@dataclass
class CniResult:
    """The final result of a chain and the pod IPs read from it."""

    raw: dict[str, Any]
    ips: list[str]

    @classmethod
    def from_raw(cls, raw: dict[str, Any], ifname: str = "eth0") -> CniResult:
        """Wrap a plugin result, extracting the pod IPs of `ifname`."""
        return cls(raw=raw, ips=pod_ips(raw, ifname))

    def to_json(self) -> str:
        """Serialise for the sandbox store."""
        return json.dumps({"raw": self.raw, "ips": self.ips}, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> CniResult:
        """Inverse of to_json; accepts the decoded dict too."""
        obj = json.loads(data) if isinstance(data, (str, bytes)) else data
        return cls(raw=obj["raw"], ips=list(obj["ips"]))


class CniError(errors.Internal):
    """A plugin failed; the fields say which plugin, which command, and what it reported."""

    def __init__(
        self,
        message: str,
        *,
        plugin: str = "",
        command: str = "",
        code: int | None = None,
        msg: str = "",
        details: str = "",
        stderr: str = "",
    ) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.command = command
        self.cni_code = code  # not `code`: that is the gRPC status every CriError carries
        self.msg = msg
        self.details = details
        self.stderr = stderr


def format_cni_args(args: dict[str, str]) -> str:
    """CNI_ARGS as libcni builds it: `IgnoreUnknown=1;K=V;...`, so plugins skip keys they don't know."""
    if not args:
        return ""
    pairs = [] if "IgnoreUnknown" in args else [("IgnoreUnknown", "1")]
    pairs.extend(args.items())
    for key, value in pairs:
        # plugins split on ';' then on '=' and reject a pair that does not give exactly two parts
        if not key or any(c in f"{key}{value}" for c in "=;"):
            raise errors.InvalidArgument(f"CNI arg {key!r}={value!r} cannot be encoded in CNI_ARGS")
    return ";".join(f"{key}={value}" for key, value in pairs)


def _version_tuple(version: str) -> tuple[int, ...]:
    """'0.4.0' -> (0, 4, 0); a malformed version is an invalid config, said plainly."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise errors.InvalidArgument(f"invalid cniVersion {version!r}") from None


def version_at_least(version: str, minimum: str) -> bool:
    """Whether a cniVersion supports a feature introduced in `minimum` (cached DEL, CHECK)."""
    return _version_tuple(version) >= _version_tuple(minimum)


def plugin_config(
    network_name: str,
    cni_version: str,
    plugin: dict[str, Any],
    prev_result: dict[str, Any] | None,
    capability_args: dict[str, Any],
) -> dict[str, Any]:
    """One plugin's stdin config, built as libcni's buildOneConfig does.

    runtimeConfig only carries capabilities the plugin declares true: a plugin that
    did not ask for portMappings must not see (or act on) them.
    """
    conf = copy.deepcopy(plugin)
    conf["name"] = network_name
    conf["cniVersion"] = cni_version
    if prev_result is not None:
        conf["prevResult"] = prev_result
    declared = conf.get("capabilities")
    runtime = {}
    if isinstance(declared, dict):
        runtime = {cap: capability_args[cap] for cap, on in declared.items() if on is True and cap in capability_args}
    if runtime:
        conf["runtimeConfig"] = runtime
    return conf


def pod_ips(raw: dict[str, Any], ifname: str = "eth0") -> list[str]:
    """Pod IPs (no prefix length) from a CNI result of any version, IPv4 first.

    0.3.0+ results list `ips` pointing at `interfaces` by index: the IPs on the
    container interface `ifname` win; failing that, IPs on any in-sandbox interface or
    with no interface index (some IPAM-only chains). 0.1/0.2 results have ip4/ip6.
    """
    if isinstance(raw.get("ips"), list):
        return _bare_sorted(_ips_by_interface(raw, ifname))
    legacy = [raw[key].get("ip") for key in ("ip4", "ip6") if isinstance(raw.get(key), dict)]
    return _bare_sorted([ip for ip in legacy if ip])


def _ips_by_interface(raw: dict[str, Any], ifname: str) -> list[str]:
    """Addresses of a 0.3.0+ result: those on `ifname`, else those in the sandbox or unattributed.

    Host-side addresses (the bridge's gateway in some results) are never pod IPs.
    """
    interfaces: list[Any] = raw["interfaces"] if isinstance(raw.get("interfaces"), list) else []
    on_ifname: list[str] = []
    others: list[str] = []
    for entry in raw["ips"]:
        if not isinstance(entry, dict) or not entry.get("address"):
            continue
        index = entry.get("interface")
        if not isinstance(index, int) or not 0 <= index < len(interfaces):
            others.append(entry["address"])
            continue
        iface = interfaces[index] if isinstance(interfaces[index], dict) else {}
        if iface.get("name") == ifname:
            on_ifname.append(entry["address"])
        elif iface.get("sandbox"):
            others.append(entry["address"])
    return on_ifname or others


def _bare_sorted(addresses: list[str]) -> list[str]:
    """Strip prefix lengths, drop duplicates and garbage, IPv4 before IPv6 (kubelet's primary IP)."""
    seen: dict[str, int] = {}
    for address in addresses:
        try:
            ip = ipaddress.ip_interface(address).ip
        except ValueError:
            continue
        seen.setdefault(str(ip), ip.version)
    return sorted(seen, key=lambda ip: seen[ip])


def parse_plugin_error(plugin: str, command: str, returncode: int, stdout: bytes, stderr: bytes) -> CniError:
    """A CniError from a failed plugin run: the CNI error JSON on stdout, else its raw output."""
    err_text = stderr.decode(errors="replace").strip()[-STDERR_LIMIT:]
    code: int | None = None
    msg = details = ""
    try:
        body = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        body = None
    if isinstance(body, dict) and ("msg" in body or "code" in body):
        code = body.get("code") if isinstance(body.get("code"), int) else None
        msg = str(body.get("msg", ""))
        details = str(body.get("details", ""))
    else:
        msg = stdout.decode(errors="replace").strip()[-STDERR_LIMIT:] or f"exit status {returncode}"
    text = f"CNI plugin {plugin} failed ({command})"
    text += f": code {code}" if code is not None else ""
    text += f": {msg}" if msg else ""
    text += f": {details}" if details else ""
    text += f"; stderr: {err_text}" if err_text else ""
    return CniError(text, plugin=plugin, command=command, code=code, msg=msg, details=details, stderr=err_text)


def _check_name(kind: str, value: str) -> None:
    """Names become parts of a cache file name: refuse anything that could escape the dir."""
    if not value or value in (".", "..") or "/" in value or "\0" in value:
        raise errors.InvalidArgument(f"invalid {kind} {value!r} for CNI")


def _validate(req: CniRequest, network: NetworkConfig | None) -> None:
    """Refuse a bad request before any plugin runs: failing halfway would need a rollback that fails too."""
    _check_name("container id", req.container_id)
    _check_name("interface name", req.ifname)
    format_cni_args(req.args)
    if network is not None:
        _check_name("network name", network.name)
        _version_tuple(network.cni_version)


async def _finish_despite_cancel(awaitable: Awaitable[T]) -> T:
    """Await cleanup to its end even if the caller is cancelled meanwhile, then honour the cancel.

    A rollback cut short by a client's deadline is exactly how IP allocations leak;
    plugin timeouts bound how long this can take.
    """
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


@dataclass
class _CacheEntry:
    """A cached ADD: the network and request as used, the result, and the file holding them."""

    path: str
    network: NetworkConfig
    request: CniRequest
    result: CniResult


class Cni:
    """Runs network lists through plugin binaries and keeps their results on disk."""

    def __init__(self, bin_dirs: list[str], cache_dir: str, timeout: float = 60) -> None:
        self.bin_dirs = list(bin_dirs)
        self.cache_dir = cache_dir
        self.timeout = timeout

    # ---- plugin exec -------------------------------------------------------------

    def _env(self, command: str, req: CniRequest, netns: str) -> dict[str, str]:
        """The daemon's env (plugins need PATH for iptables) plus the CNI_* protocol variables."""
        env = dict(os.environ)
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=req.container_id,
            CNI_NETNS=netns,
            CNI_IFNAME=req.ifname,
            CNI_ARGS=format_cni_args(req.args),
            CNI_PATH=os.pathsep.join(self.bin_dirs),
        )
        return env

    async def _exec(self, command: str, conf: dict[str, Any], req: CniRequest, netns: str) -> dict[str, Any] | None:
        """Run one plugin; its parsed stdout on success, CniError on failure or timeout."""
        plugin = str(conf["type"])
        path = find_plugin(plugin, self.bin_dirs)
        if path is None:
            raise CniError(
                f"CNI plugin {plugin} not found in {os.pathsep.join(self.bin_dirs)}", plugin=plugin, command=command
            )
        proc = await asyncio.create_subprocess_exec(
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(command, req, netns),
            start_new_session=True,  # its own process group: a timeout kills the iptables it forked too
        )
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(json.dumps(conf).encode()), self.timeout)
        except TimeoutError:
            await self._kill(proc)
            raise CniError(
                f"CNI plugin {plugin} failed ({command}): timed out after {self.timeout:g}s",
                plugin=plugin,
                command=command,
                msg="timed out",
            ) from None
        except BaseException:
            await _finish_despite_cancel(self._kill(proc))
            raise
        if proc.returncode != 0:
            raise parse_plugin_error(plugin, command, proc.returncode or 0, stdout, stderr)
        return self._parse_output(plugin, command, stdout)

    @staticmethod
    async def _kill(proc: asyncio.subprocess.Process) -> None:
        """Kill a plugin's whole process group (by its pgid, which is its pid) and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()

    @staticmethod
    def _parse_output(plugin: str, command: str, stdout: bytes) -> dict[str, Any] | None:
        """A successful plugin's result JSON; DEL and CHECK may print nothing."""
        if not stdout.strip():
            return None
        try:
            result = json.loads(stdout)
        except ValueError:
            result = None
        if not isinstance(result, dict):
            raise CniError(
                f"CNI plugin {plugin} ({command}) printed an invalid result: {stdout[:200]!r}",
                plugin=plugin,
                command=command,
            )
        return result

    # ---- chains ------------------------------------------------------------------

    async def _add_chain(self, network: NetworkConfig, req: CniRequest) -> dict[str, Any]:
        """ADD every plugin in order, each seeing the previous one's result; returns the last."""
        result: dict[str, Any] | None = None
        for plugin in network.plugins:
            conf = plugin_config(network.name, network.cni_version, plugin, result, req.capability_args)
            out = await self._exec("ADD", conf, req, req.netns)
            if out is None:
                raise CniError(
                    f"CNI plugin {plugin['type']} (ADD) printed no result", plugin=plugin["type"], command="ADD"
                )
            result = out
        assert result is not None  # a NetworkConfig always has at least one plugin
        return result

    async def _del_chain(
        self, network: NetworkConfig, req: CniRequest, netns: str, prev_result: dict[str, Any] | None
    ) -> list[CniError]:
        """DEL every plugin in reverse order; keeps going past failures so each releases what it can."""
        if not version_at_least(network.cni_version, "0.4.0"):
            prev_result = None  # prevResult on DEL only exists from CNI 0.4.0; older plugins may reject it
        failures: list[CniError] = []
        for plugin in reversed(network.plugins):
            conf = plugin_config(network.name, network.cni_version, plugin, prev_result, req.capability_args)
            try:
                await self._exec("DEL", conf, req, netns)
            except CniError as exc:
                failures.append(exc)
        return failures

    async def _rollback(self, network: NetworkConfig, req: CniRequest, exc: BaseException) -> None:
        """Undo a failed ADD with a DEL of the whole chain (plugins DEL what they never added fine)."""
        failures = await _finish_despite_cancel(self._del_chain(network, req, req.netns, None))
        for failure in failures:
            exc.add_note(f"rollback DEL also failed: {failure}")
        # a result cached just before a cancel must not claim the pod has a network
        self._remove_cache(self._cache_path(network.name, req.container_id, req.ifname))

    # ---- public API --------------------------------------------------------------

    async def add(self, network: NetworkConfig, req: CniRequest) -> CniResult:
        """Attach the pod to `network`; on any failure the partial setup is deleted before raising."""
        _validate(req, network)
        try:
            raw = await self._add_chain(network, req)
            result = CniResult.from_raw(raw, req.ifname)
            # finished even if cancelled, so the rollback below knows whether there is a file to remove
            await _finish_despite_cancel(asyncio.to_thread(self._write_cache, network, req, result))
            return result
        except BaseException as exc:
            await self._rollback(network, req, exc)
            raise

    async def delete(self, network: NetworkConfig | None, req: CniRequest) -> None:
        """Detach the pod, with the cached network and result when there are some; idempotent.

        A missing or already-removed netns is passed as CNI_NETNS="" (CNI spec: plugins
        must then release what they can without the namespace). On failure the cache
        entry stays, so the kubelet's retry tears down with the same config.
        """
        _validate(req, network)
        entry = await asyncio.to_thread(
            self._find_cache, req.container_id, req.ifname, network.name if network else None
        )
        if entry is None and network is None:
            return
        prev_result: dict[str, Any] | None = None
        if entry is not None:
            network = entry.network
            prev_result = entry.result.raw
            req = self._merge_request(entry.request, req)
        assert network is not None
        netns = req.netns if req.netns and netns_exists(req.netns) else ""
        failures = await self._del_chain(network, req, netns, prev_result)
        if failures:
            first = failures[0]
            for other in failures[1:]:
                first.add_note(str(other))
            raise first
        if entry is not None:
            await asyncio.to_thread(self._remove_cache, entry.path)

    async def check(self, network: NetworkConfig | None, req: CniRequest) -> None:
        """Ask every plugin whether the pod's network is still as ADD left it (CNI >= 0.4.0)."""
        _validate(req, network)
        entry = await asyncio.to_thread(
            self._find_cache, req.container_id, req.ifname, network.name if network else None
        )
        if entry is None:
            raise errors.FailedPrecondition(f"no cached CNI result for {req.container_id}/{req.ifname} to CHECK")
        network = network or entry.network
        if not version_at_least(network.cni_version, "0.4.0") or network.raw.get("disableCheck") is True:
            return  # CHECK does not exist before 0.4.0; disableCheck opts a network out
        req = self._merge_request(entry.request, req)
        for plugin in network.plugins:
            conf = plugin_config(network.name, network.cni_version, plugin, entry.result.raw, req.capability_args)
            await self._exec("CHECK", conf, req, req.netns)

    def cached(self, container_id: str, ifname: str = "eth0") -> CniResult | None:
        """The cached ADD result of a pod interface, e.g. to report pod IPs after a restart."""
        entry = self._find_cache(container_id, ifname, None)
        return entry.result if entry else None

    # ---- cache -------------------------------------------------------------------

    @staticmethod
    def _merge_request(cached: CniRequest, given: CniRequest) -> CniRequest:
        """The caller's non-empty values win; what it leaves empty comes from the ADD.

        An empty value never overrides a cached one: portmap's DEL does nothing without
        runtimeConfig.portMappings, so a request rebuilt without them (after a restart)
        would leave the pod's DNAT rules behind.
        """
        given_caps = {k: v for k, v in given.capability_args.items() if v not in (None, "", [], {})}
        return CniRequest(
            container_id=given.container_id,
            netns=given.netns or cached.netns,
            ifname=given.ifname,
            args=given.args or cached.args,
            capability_args={**cached.capability_args, **given_caps},
        )

    def _cache_path(self, network_name: str, container_id: str, ifname: str) -> str:
        """cache_dir/<network>-<container_id>-<ifname>.json, as the daemon's layout documents."""
        return os.path.join(self.cache_dir, f"{network_name}-{container_id}-{ifname}.json")

    def _write_cache(self, network: NetworkConfig, req: CniRequest, result: CniResult) -> None:
        """Persist config, request and result atomically: a torn cache would make DEL guess."""
        os.makedirs(self.cache_dir, mode=0o700, exist_ok=True)
        entry = {
            "kind": CACHE_KIND,
            "network": network.name,
            "config": network.raw,
            "request": asdict(req),
            "result": result.raw,
        }
        atomic_write(self._cache_path(network.name, req.container_id, req.ifname), json.dumps(entry).encode())

    def _find_cache(self, container_id: str, ifname: str, network_name: str | None) -> _CacheEntry | None:
        """The cache entry of a pod interface, preferring `network_name` if several networks have one.

        File names alone are ambiguous (network names may contain '-'), so the entry's
        own container id and ifname decide.
        """
        suffix = f"-{container_id}-{ifname}.json"
        try:
            names = sorted(n for n in os.listdir(self.cache_dir) if n.endswith(suffix))
        except FileNotFoundError:
            return None
        entries = [e for e in (self._read_cache(os.path.join(self.cache_dir, n)) for n in names) if e]
        entries = [e for e in entries if e.request.container_id == container_id and e.request.ifname == ifname]
        for entry in entries:
            if entry.network.name == network_name:
                return entry
        return entries[0] if entries else None

    @staticmethod
    def _read_cache(path: str) -> _CacheEntry | None:
        """Load one cache file; an unreadable one is ignored (it cannot be acted on anyway)."""
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read())
            config = data["config"]
            network = NetworkConfig(
                name=config["name"],
                cni_version=config["cniVersion"],
                plugins=config["plugins"],
                source=path,
                raw=config,
            )
            request = CniRequest.from_dict(data["request"])
            return _CacheEntry(path, network, request, CniResult.from_raw(data["result"], request.ifname))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _remove_cache(path: str) -> None:
        """Forget a torn-down pod interface."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
