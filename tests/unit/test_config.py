"""Config parsing: defaults round-trip, every error names its key."""

import subprocess
import sys

import pytest

from cri_py.config import Config, ConfigError, default_toml, load_config, parse_config


def test_default_toml_parses_back_to_the_defaults():
    assert parse_config(default_toml()) == Config()


def test_defaults_have_the_documented_values():
    cfg = Config()
    assert cfg.root == "/var/lib/cri-py"
    assert cfg.state == "/run/cri-py"
    assert cfg.socket_path == "/run/cri-py/cri-py.sock"
    assert cfg.metrics.address == "127.0.0.1:9127"
    assert cfg.cni.conf_dir == "/etc/cni/net.d"
    assert cfg.cni.bin_dirs == ["/opt/cni/bin", "/usr/lib/cni"]
    assert cfg.image.sandbox_image == "registry.k8s.io/pause:3.10"
    assert cfg.runtime.cgroup_driver == "cgroupfs"
    assert cfg.handler("") is cfg.runtime.handlers["runc"]


def test_a_file_overrides_keys_one_by_one():
    cfg = parse_config(
        """
        root = "/srv/cri"
        [grpc]
        address = "unix:///tmp/x.sock"
        [registry]
        insecure = ["127.0.0.1:5000"]
        [registry.mirrors."docker.io"]
        endpoints = ["http://127.0.0.1:5000", "https://mirror.example"]
        [runtime.handlers.kata]
        binary = "/usr/bin/kata-runtime"
        """
    )
    assert cfg.root == "/srv/cri"
    assert cfg.state == "/run/cri-py"
    assert cfg.socket_path == "/tmp/x.sock"
    assert cfg.registry.mirrors["docker.io"].endpoints[0] == "http://127.0.0.1:5000"
    assert cfg.registry.insecure == ["127.0.0.1:5000"]
    # a new handler adds to the built-in one
    assert set(cfg.runtime.handlers) == {"runc", "kata"}


@pytest.mark.parametrize(
    "text, key",
    [
        ('rot = "/x"', "rot: unknown key"),
        ('[grpc]\nadress = "/x"', "grpc.adress: unknown key"),
        ("[streaming]\nport = true", "streaming.port"),
        ('[streaming]\nport = "10010"', "streaming.port"),
        ("[streaming]\nport = 70000", "streaming.port"),
        ('[runtime]\ncgroup_driver = "cgroup"', "runtime.cgroup_driver"),
        ('[log]\nlevel = "loud"', "log.level"),
        ('[log]\nformat = "xml"', "log.format"),
        ("[cni]\nbin_dirs = [1, 2]", "cni.bin_dirs"),
        ('[cni]\nbin_dirs = "/opt/cni/bin"', "cni.bin_dirs"),
        ('[metrics]\naddress = "9127"', "metrics.address"),
        ('root = "relative"', "root"),
        ('[registry.mirrors."docker.io"]\nendpoints = ["127.0.0.1:5000"]', "registry.mirrors.docker.io.endpoints"),
        ('[registry.mirrors."docker.io"]\nendpoint = ["http://x"]', "registry.mirrors.docker.io.endpoint: unknown key"),
        ('[runtime]\ndefault_handler = "kata"', "runtime.default_handler"),
        ("grpc = 3", "grpc: expected a table"),
        ("[runtime.handlers.runc]\nno_pivot_root = 1", "runtime.handlers.runc.no_pivot_root"),
    ],
)
def test_bad_keys_and_values_are_named(text, key):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert str(err.value).startswith(key), str(err.value)
    assert "\n" not in str(err.value)


def test_invalid_toml_names_the_file():
    with pytest.raises(ConfigError, match="my.toml: invalid TOML"):
        parse_config("root = ", "my.toml")


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.toml"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "cri_py.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_config_default_prints_parseable_toml():
    result = _cli("config", "default")
    assert result.returncode == 0
    assert parse_config(result.stdout) == Config()


def test_cli_bad_config_exits_2_with_one_line_naming_the_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[grpc]\nadress = "/x"\n')
    result = _cli("config", "check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["cri-py: config: grpc.adress: unknown key"]
