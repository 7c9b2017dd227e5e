"""nmbridge: a software L2 bridge over netmap rings with a zero-copy Cython fast path."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nmbridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.1.0"

__all__ = ["__version__"]
