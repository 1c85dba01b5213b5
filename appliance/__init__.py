"""The classroom attendance appliance: frames in, attendance records out."""

import os
from importlib.metadata import PackageNotFoundError, version

# OpenCV reads its decoder limit once, when cv2 is loaded: set it before anything imports cv2
# (appliance.vision.decode: an image's header is checked before decoding; this is the fence
# behind it).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "40000000")

try:
    # The installed distribution's version: a release built by the fleet tooling carries its
    # git commit (e.g. 0.1.0+g1a2b3c4), so /health tells which release a device runs.
    __version__ = version("classroom-attendance")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.1.0"
