"""Image bytes -> BGR pixels, without letting a small file allocate gigabytes.

A compressed image's header says how large it is, and the decoder believes it: a 34-byte
lossless WebP that declares 16383x16383 decodes to 800 MB of pixels. :func:`decode_image`
therefore reads the header first (Pillow opens lazily: the format and the size, no pixel data),
refuses a format outside the allowed list and a size over the limits, and only then decodes
(OpenCV, as before). Two fences behind it: Pillow's ``MAX_IMAGE_PIXELS`` and OpenCV's
``OPENCV_IO_MAX_IMAGE_PIXELS`` are set to :data:`MAX_PIXELS` (OpenCV reads its limit once, when
cv2 is loaded: ``appliance/__init__.py`` and ``cloud_sync/__init__.py`` set the variable before
anything imports cv2).

Used for every image the aggregator receives (API and console photo uploads, devices'
unknown-face crops, kept photos re-encoded, ``faces encode --batch``) and for the photos of
``appliance roster build``.
"""

from __future__ import annotations

import io
import os
import warnings

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # a 40-megapixel photo; nothing enrolled needs more
# what an upload may be (Pillow's format names); a local roster photo may also be PPM/PGM/TIFF
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
LOCAL_FORMATS = (*UPLOAD_FORMATS, "PPM", "TIFF")

os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))  # late here: see above
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow warns between MAX_IMAGE_PIXELS and twice that (it raises above): image_size refuses
# those itself, so the warning would only be noise in the log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageRejectedError(ValueError):
    """Not an image of an allowed format, or larger than allowed: the message says which."""


def _names(formats: tuple[str, ...]) -> str:
    return ", ".join("WebP" if f == "WEBP" else f for f in formats)


def image_size(data: bytes, formats: tuple[str, ...] = UPLOAD_FORMATS) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; no pixel is decoded."""
    if not data:
        raise ImageRejectedError("empty image")
    try:
        with Image.open(io.BytesIO(data), formats=list(formats)) as image:
            return str(image.format), int(image.width), int(image.height)
    except Image.DecompressionBombError as err:
        raise ImageRejectedError(f"image larger than {MAX_PIXELS} pixels") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageRejectedError(f"not an image of an accepted format "
                                 f"({_names(formats)})") from err


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS, max_side: int | None = None,
                 formats: tuple[str, ...] = UPLOAD_FORMATS) -> np.ndarray:
    """BGR uint8 pixels of ``data`` (EXIF orientation applied), after its header showed an
    allowed format of at most ``max_pixels`` pixels and ``max_side`` pixels a side;
    ImageRejectedError otherwise (before any pixel is decoded)."""
    kind, width, height = image_size(data, formats)
    if width <= 0 or height <= 0:
        raise ImageRejectedError("the image has no size")
    if width * height > max_pixels:
        raise ImageRejectedError(f"image of {width}x{height} pixels: larger than "
                                 f"{max_pixels} pixels")
    if max_side is not None and max(width, height) > max_side:
        raise ImageRejectedError(f"image of {width}x{height} pixels: larger than {max_side} "
                                 "px a side")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:  # OpenCV's own limit, or a stream it cannot read
        image = None
    if image is None or image.size == 0:
        raise ImageRejectedError(f"not a decodable {kind} image")
    if image.shape[0] * image.shape[1] > width * height:  # the data and its header disagree
        raise ImageRejectedError("the image data does not match its header")
    return image
