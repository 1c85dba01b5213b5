"""The classroom attendance appliance: frames in, attendance records out."""

from importlib.metadata import PackageNotFoundError, version

try:
    # The installed distribution's version: a release built by the fleet tooling carries its
    # git commit (e.g. 0.1.0+g1a2b3c4), so /health tells which release a device runs.
    __version__ = version("classroom-attendance")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
