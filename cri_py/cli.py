"""The `cri-py` command: `serve`, `config default`.

Exit codes: 0 success, 1 the server failed at run time, 2 bad usage or configuration
(one line on stderr naming the problem, so a service manager's log says it all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

from cri_py import __version__
from cri_py.config import Config, ConfigError, default_toml, load_config

EXIT_USAGE = 2


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: Config) -> None:
    """Configure the root logger from `[log]`."""
    handler = logging.StreamHandler(sys.stderr)
    if config.log.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log.level.upper())


def _serve(args: argparse.Namespace) -> int:
    from cri_py.server import ServerError, serve  # keep `config default` free of grpc imports

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"cri-py: config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config)
    try:
        asyncio.run(serve(config))
    except ServerError as exc:
        print(f"cri-py: {exc}", file=sys.stderr)
        return 1
    return 0


def _config_default(args: argparse.Namespace) -> int:
    sys.stdout.write(default_toml())
    return 0


def _config_check(args: argparse.Namespace) -> int:
    try:
        load_config(args.config)
    except ConfigError as exc:
        print(f"cri-py: config: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("config ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cri-py", description="A Kubernetes CRI runtime that runs containers with runc.")
    parser.add_argument("--version", action="version", version=f"cri-py {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the CRI server")
    serve.add_argument("--config", help="config file (default /etc/cri-py/config.toml when present)")
    serve.set_defaults(func=_serve)

    config = sub.add_parser("config", help="configuration helpers")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    default = config_sub.add_parser("default", help="print the complete default config as TOML")
    default.set_defaults(func=_config_default)
    check = config_sub.add_parser("check", help="validate a config file and exit")
    check.add_argument("--config", help="config file (default /etc/cri-py/config.toml when present)")
    check.set_defaults(func=_config_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
