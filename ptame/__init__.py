"""ptame: P-TAME saliency explanations for any image classifier, trained in one pass per image."""

from importlib.metadata import PackageNotFoundError, version

from ptame.explanations import read_explanations

try:
    __version__ = version("ptame")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__", "read_explanations"]
