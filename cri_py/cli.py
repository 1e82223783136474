"""The `cri-py` command: `serve`, `config default|check`, `images import|ls`.

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
    # httpx logs every request at INFO; a pull of 10 layers is not 12 log lines
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("grpc._cython").setLevel(logging.INFO)  # one line per call about its event loop


def _serve(args: argparse.Namespace) -> int:
    from cri_py.server import ServerError, serve  # keep `config default` free of grpc imports

    config = _load_or_exit(args.config)
    if config is None:
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
    if _load_or_exit(args.config) is None:
        return EXIT_USAGE
    print("config ok")
    return 0


def _daemon_listening(socket_path: str) -> bool:
    """Whether a daemon answers on the socket (then it owns the store)."""
    import socket

    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(socket_path)
        except OSError:
            return False
    return True


async def _with_local_images(config: Config, action):  # noqa: ANN001, ANN202
    """Run `action(images)` on the store directly, holding the root lock like a daemon."""
    import os

    from cri_py.image.images import ImageManager
    from cri_py.server import lock_root
    from cri_py.store import Store

    os.makedirs(config.root, mode=0o711, exist_ok=True)
    fd = lock_root(config.root)
    store = Store(config.root)
    try:
        images = ImageManager(config, store)
        await images.load()
        return await action(images)
    finally:
        store.close()
        os.close(fd)


def _images_import(args: argparse.Namespace) -> int:
    import os

    from cri_py import admin
    from cri_py.errors import CriError
    from cri_py.server import ServerError

    config = _load_or_exit(args.config)
    if config is None:
        return EXIT_USAGE
    path = os.path.abspath(args.file)
    try:
        if _daemon_listening(config.socket_path):
            result = admin.call_import(config.socket_path, path, args.name)
        else:
            records = asyncio.run(_with_local_images(config, lambda images: images.import_archive(path, args.name)))
            result = {"images": admin.summary(records)}
    except (CriError, ServerError) as exc:
        print(f"cri-py: import: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # grpc.RpcError from the daemon carries its message
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"cri-py: import: {details}", file=sys.stderr)
        return 1
    for image in result["images"]:
        print(f"imported {image['id']} {' '.join(image['repo_tags'] or image['repo_digests'])}")
    return 0


def _images_ls(args: argparse.Namespace) -> int:
    from cri_py.server import ServerError

    config = _load_or_exit(args.config)
    if config is None:
        return EXIT_USAGE

    async def listing(images):  # noqa: ANN001, ANN202
        return images.list()

    try:
        records = asyncio.run(_with_local_images(config, listing)) if not _daemon_listening(config.socket_path) else None
    except ServerError as exc:
        print(f"cri-py: {exc}", file=sys.stderr)
        return 1
    rows = []
    if records is None:
        import grpc
        from cri_api.v1 import api_pb2 as cri
        from cri_api.v1 import api_pb2_grpc as cri_grpc

        with grpc.insecure_channel(f"unix://{config.socket_path}") as channel:
            response = cri_grpc.ImageServiceStub(channel).ListImages(cri.ListImagesRequest(), timeout=30)
        rows = [(list(i.repo_tags) or list(i.repo_digests) or ["<none>"], i.id, i.size) for i in response.images]
    else:
        rows = [(r.repo_tags or r.repo_digests or ["<none>"], r.id, r.size) for r in records]
    print(f"{'IMAGE':<60} {'ID':<20} SIZE")
    for names, image_id, size in rows:
        print(f"{names[0]:<60} {image_id[7:20]:<20} {size / 1e6:.1f}MB")
    return 0


def _load_or_exit(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"cri-py: config: {exc}", file=sys.stderr)
        return None


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

    images = sub.add_parser("images", help="the image store")
    images_sub = images.add_subparsers(dest="images_command", required=True)
    imp = images_sub.add_parser("import", help="load an OCI image layout archive or a docker save tarball")
    imp.add_argument("file", help="the archive")
    imp.add_argument("--name", help="tag the archive's only image with this reference")
    imp.add_argument("--config", help="config file (default /etc/cri-py/config.toml when present)")
    imp.set_defaults(func=_images_import)
    ls = images_sub.add_parser("ls", help="list stored images")
    ls.add_argument("--config", help="config file (default /etc/cri-py/config.toml when present)")
    ls.set_defaults(func=_images_ls)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
