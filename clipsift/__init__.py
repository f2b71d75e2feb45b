"""clipsift: a DataComp-style benchmark for image-text dataset curation."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("clipsift")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"


class ClipsiftError(Exception):
    """An error caused by the user's input: the message names the file/sample and what to do.

    The CLI prints these without a traceback and exits with status 2.
    """
