"""buildfuzz: a configuration fuzzer for Docker BuildKit and buildx."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("buildfuzz")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
