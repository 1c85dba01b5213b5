"""The embedder interface and its two implementations.

An embedder turns detections in a frame into 128-d descriptors. Two exist:

- ``sface`` (default): OpenCV Zoo's SFace, int8, on ``cv2.dnn``
  (:class:`appliance.vision.sface.SFaceEmbedder`); unit-length descriptors, cosine distance.
- ``dlib``: dlib's ResNet through the same computation as ``face_recognition``
  (:class:`appliance.vision.embedder.FaceEmbedder`); Euclidean distance. Kept as the
  alternative and as the benchmark baseline.

Descriptors of different embedders live in different spaces: a roster records the embedder and
model version that made it (:func:`embedder_id`), and a device refuses a roster of another one.
The calibrated threshold and margin of each embedder (``CALIBRATED``) come from
``python -m bench.recognition tune EMBEDDER`` on the lfw_dev *tuning* people only (see
docs/RECOGNITION.md); ``recognition.threshold`` / ``recognition.margin`` override them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from appliance.vision.detector import Detection
from cloud_sync.calibration import CALIBRATION
from cloud_sync.protocol import EMBEDDER_IDS

EmbedderName = Literal["sface", "dlib"]
EMBEDDER_NAMES: tuple[EmbedderName, ...] = ("sface", "dlib")
DEFAULT_EMBEDDER: EmbedderName = "sface"


class Embedder(Protocol):
    name: str
    model_version: str
    metric: str  # "cosine" | "euclidean"

    def embed(self, frame_bgr: np.ndarray, detections: Sequence[Detection], *,
              num_jitters: int | None = None,
              flip_average: bool | None = None) -> np.ndarray: ...


@dataclass(frozen=True)
class EmbedderSpec:
    """What is known about an embedder without loading it."""

    name: EmbedderName
    model_version: str
    metric: Literal["cosine", "euclidean"]
    threshold: float  # calibrated on the tuning people (docs/RECOGNITION.md)
    margin: float
    models: tuple[str, ...]  # manifest entries it needs
    split_distance: float  # a track's descriptor this far from its mean is another person

    @property
    def id(self) -> str:
        """``name/model_version``: what a roster records."""
        return f"{self.name}/{self.model_version}"


# threshold and margin: the default operating point of cloud_sync.calibration (the measured
# false-accept points the console's and the status page's match words come from too)
CALIBRATED: dict[str, EmbedderSpec] = {
    "sface": EmbedderSpec("sface", EMBEDDER_IDS["sface"].split("/")[1], "cosine",
                          CALIBRATION["sface"].threshold, CALIBRATION["sface"].margin,
                          ("sface_int8",), 0.65),
    "dlib": EmbedderSpec("dlib", EMBEDDER_IDS["dlib"].split("/")[1], "euclidean",
                         CALIBRATION["dlib"].threshold, CALIBRATION["dlib"].margin,
                         ("dlib_shape_predictor_5", "dlib_face_recognition_resnet"), 0.6),
}


def spec(name: str) -> EmbedderSpec:
    try:
        return CALIBRATED[name]
    except KeyError:
        raise ValueError(f"unknown embedder {name!r} (known: {', '.join(CALIBRATED)})") from None


def embedder_id(name: str) -> str:
    return spec(name).id


def create_embedder(name: str, model_dir: Path, *, detector_model: str = "yunet",
                    threads: int = 1) -> Embedder:
    """Load the named embedder's models (size + sha256 checked) and return it."""
    spec(name)
    if name == "sface":
        from appliance.vision.sface import SFaceEmbedder

        return SFaceEmbedder(model_dir, detector_model=detector_model, threads=threads)
    from appliance.vision.embedder import FaceEmbedder

    return FaceEmbedder(model_dir, detector_model=detector_model)
