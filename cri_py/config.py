"""Configuration: typed defaults, strict TOML loading, and TOML output of the defaults.

Every key has an embedded default so `cri-py serve` runs with no file at all. A file
overrides keys one by one; an unknown key or a value of the wrong type is refused
with one line naming the key, because a typo silently ignored (a mirror that is never
used, a cgroup driver that is not the kubelet's) costs an operator hours.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/cri-py/config.toml"


class ConfigError(Exception):
    """A configuration problem, phrased as one line that names the key."""


@dataclass
class GrpcConfig:
    """Where the CRI gRPC server listens."""

    address: str = "/run/cri-py/cri-py.sock"
    max_recv_message_size: int = 16 * 1024 * 1024
    max_send_message_size: int = 16 * 1024 * 1024


@dataclass
class MetricsConfig:
    """The Prometheus endpoint; an empty address disables it."""

    address: str = "127.0.0.1:9127"


@dataclass
class StreamingConfig:
    """The exec/attach/port-forward HTTP server the kubelet redirects clients to."""

    address: str = "127.0.0.1"
    port: int = 10010
    tls_cert_file: str = ""
    tls_key_file: str = ""
    token_ttl_seconds: int = 60
    idle_timeout_seconds: int = 4 * 3600


@dataclass
class CniConfig:
    """Where CNI network configs and plugin binaries are found."""

    conf_dir: str = "/etc/cni/net.d"
    bin_dirs: list[str] = field(default_factory=lambda: ["/opt/cni/bin", "/usr/lib/cni"])
    # rendered into <conf_dir>/10-cri-py.conflist with the kubelet's pod CIDRs (UpdateRuntimeConfig)
    conf_template: str = ""


@dataclass
class ImageConfig:
    """Image defaults."""

    sandbox_image: str = "registry.k8s.io/pause:3.10"
    max_concurrent_downloads: int = 3


@dataclass
class MirrorConfig:
    """Endpoints tried in order before a registry host itself."""

    endpoints: list[str] = field(default_factory=list)
    # false: never contact the host itself (air-gapped nodes, tests)
    upstream: bool = True


@dataclass
class RegistryConfig:
    """Registry access: mirrors per host and hosts reached over plain http."""

    insecure: list[str] = field(default_factory=list)
    mirrors: dict[str, MirrorConfig] = field(default_factory=dict)


@dataclass
class HandlerConfig:
    """One runtime handler (RuntimeClass): an OCI runtime binary and its options."""

    binary: str = ""
    root: str = ""
    no_pivot_root: bool = False
    extra_args: list[str] = field(default_factory=list)


@dataclass
class RuntimeSection:
    """The OCI runtime and how cgroups are managed."""

    runc: str = "runc"
    cgroup_driver: str = "cgroupfs"
    default_handler: str = "runc"
    handlers: dict[str, HandlerConfig] = field(
        default_factory=lambda: {"runc": HandlerConfig()}
    )


@dataclass
class LogConfig:
    """The daemon's own log (container logs are written by the shims)."""

    level: str = "info"
    format: str = "text"


@dataclass
class Config:
    """The whole daemon configuration."""

    root: str = "/var/lib/cri-py"
    state: str = "/run/cri-py"
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    cni: CniConfig = field(default_factory=CniConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def socket_path(self) -> str:
        """The filesystem path of the gRPC unix socket."""
        return socket_path_of(self.grpc.address)

    def handler(self, name: str) -> HandlerConfig | None:
        """The handler a RuntimeClass names; the empty name is the default one."""
        return self.runtime.handlers.get(name or self.runtime.default_handler)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for `Status(verbose)` and for printing as TOML."""
        return dataclasses.asdict(self)


def socket_path_of(address: str) -> str:
    """Accept both `unix:///path` (the kubelet's spelling) and a bare path."""
    if address.startswith("unix://"):
        return address[len("unix://") :]
    return address


# --- validation of values that a type alone does not constrain -------------------

_CHOICES: dict[str, tuple[str, ...]] = {
    "runtime.cgroup_driver": ("cgroupfs", "systemd"),
    "log.level": ("debug", "info", "warning", "error"),
    "log.format": ("text", "json"),
}


def _check_values(cfg: Config) -> None:
    """Refuse values of the right type that cannot work."""
    flat = {
        "runtime.cgroup_driver": cfg.runtime.cgroup_driver,
        "log.level": cfg.log.level,
        "log.format": cfg.log.format,
    }
    for key, value in flat.items():
        if value not in _CHOICES[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_CHOICES[key])}")
    for key, path in (("root", cfg.root), ("state", cfg.state)):
        if not os.path.isabs(path):
            raise ConfigError(f"{key}: {path!r} must be an absolute path")
    if not os.path.isabs(cfg.socket_path):
        raise ConfigError(f"grpc.address: {cfg.grpc.address!r} must be an absolute unix socket path")
    if not 0 < cfg.streaming.port < 65536:
        raise ConfigError(f"streaming.port: {cfg.streaming.port} is not a TCP port")
    if cfg.metrics.address and not _is_host_port(cfg.metrics.address):
        raise ConfigError(f"metrics.address: {cfg.metrics.address!r} is not HOST:PORT")
    if cfg.cni.conf_template and not os.path.isabs(cfg.cni.conf_template):
        raise ConfigError(f"cni.conf_template: {cfg.cni.conf_template!r} must be an absolute path")
    if bool(cfg.streaming.tls_cert_file) != bool(cfg.streaming.tls_key_file):
        raise ConfigError("streaming.tls_cert_file: a TLS certificate needs tls_key_file as well")
    if cfg.runtime.default_handler not in cfg.runtime.handlers:
        raise ConfigError(
            f"runtime.default_handler: {cfg.runtime.default_handler!r} is not in runtime.handlers"
        )
    for host, mirror in cfg.registry.mirrors.items():
        for endpoint in mirror.endpoints:
            if not endpoint.startswith(("http://", "https://")):
                raise ConfigError(
                    f"registry.mirrors.{host}.endpoints: {endpoint!r} needs http:// or https://"
                )


def _is_host_port(address: str) -> bool:
    """HOST:PORT with a numeric port (IPv6 hosts in brackets)."""
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


# --- loading ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """How a field's type is named in an error message."""
    origin = typing.get_origin(tp)
    if origin is list:
        return "list of strings"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "table"
    return {str: "string", int: "integer", bool: "boolean"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check one TOML value against a field type and build the typed value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        _, value_type = typing.get_args(tp)
        return {k: _convert(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list) or not all(isinstance(v, item_type) for v in value):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        return list(value)
    # bool is an int subclass in Python but never a valid integer setting, and vice versa
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
    return value


def _build(cls: Any, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a TOML table; defaults fill what the table omits."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in known:
            raise ConfigError(f"{dotted}: unknown key")
        kwargs[key] = _convert(hints[key], value, dotted)
        if typing.get_origin(hints[key]) is dict:
            # named tables (handlers, mirrors) add to the built-in ones, not replace them
            kwargs[key] = {**getattr(defaults, key), **kwargs[key]}
    return cls(**kwargs)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse TOML text into a validated Config."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    cfg: Config = _build(Config, data, "")
    _check_values(cfg)
    return cfg


def load_config(path: str | None = None) -> Config:
    """Load `path`, or the default file when present, or the embedded defaults.

    An explicitly named file must exist; the default path is optional.
    """
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            cfg = Config()
            _check_values(cfg)
            return cfg
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, path)


# --- output -----------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    """One TOML scalar or inline array; JSON strings are valid TOML basic strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    """Quote keys that are not bare TOML keys (registry hosts with dots)."""
    bare = key and all(c.isalnum() or c in "-_" for c in key)
    return key if bare else json.dumps(key)


def _emit_table(data: dict[str, Any], path: list[str], out: list[str]) -> None:
    """Write scalars of a table, then its sub-tables, in declaration order."""
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        out.append("")
        out.append("[" + ".".join(_toml_key(p) for p in path) + "]")
    for key, value in scalars.items():
        out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        _emit_table(value, path + [key], out)


def to_toml(cfg: Config) -> str:
    """The configuration as a complete TOML document."""
    out: list[str] = ["# cri-py configuration (cri-py config default)"]
    _emit_table(cfg.to_dict(), [], out)
    return "\n".join(out) + "\n"


def default_toml() -> str:
    """The embedded defaults, with an example mirror left as a comment."""
    example = (
        "\n# Example: pull registry.k8s.io images through a local mirror first.\n"
        '# [registry.mirrors."registry.k8s.io"]\n'
        '# endpoints = ["http://127.0.0.1:5000"]\n'
    )
    return to_toml(Config()) + example

