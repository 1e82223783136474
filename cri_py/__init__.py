"""cri-py: a Kubernetes CRI runtime that runs containers with runc directly."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("cri-py")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
