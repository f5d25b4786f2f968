"""aewatch scoring side: the detector core, the Kafka worker and its companions."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("aewatch")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
