"""Everything that crosses the network: the wire protocol, the device sync agent, the aggregator."""

import os

# OpenCV reads its decoder limit once, when cv2 is loaded: set it before anything imports cv2
# (the aggregator decodes uploaded images; appliance.vision.decode checks their headers first).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", "40000000")
