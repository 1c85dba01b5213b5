"""Tracking: per-frame face detections -> tracks with stable ids.

A face walking through the door is one track. Each frame, the detections are associated with the
live tracks by a cost that mixes overlap (IoU) and the distance between box centres relative to
the face size, so a fast-moving face (small overlap between frames) keeps its id. The track's
box is predicted one step ahead with its recent velocity before association. Association is
greedy on the cost matrix (cheapest pair first): with the few faces of a door view it gives the
same result as the Hungarian method at a fraction of the code. A track not seen for more than
``max_missed`` frames expires.

Detection need not run on every frame (``detector.detect_every_frames``): between two
detections the tracks are carried as they are, and at the next detection a track's box is
predicted over the whole gap (its velocity per frame times the frames since it was last seen);
expiry and the allowed change of face size are counted in frames, not in detector passes.

Boxes alone cannot tell two people apart when one replaces the other at the same place: a
camera cut (a video montage, a PTZ camera moving, a stream switching cameras) or two students
swapping places at the door. :class:`CutDetector` finds cuts from the frames themselves, and
:meth:`Tracker.cut` ends every track there; :meth:`Tracker.split` gives a track a new identity
when the pipeline finds that its face changed (its descriptors disagree).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import cv2
import numpy as np

from appliance.vision.detector import Detection

Box = tuple[float, float, float, float]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` (n,4) against every box of ``b`` (m,4), x1 y1 x2 y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0).astype(np.float32)


@dataclass
class Track:
    """One face over time. ``data`` is free for the pipeline (vote, samples, label...)."""

    track_id: int
    box: Box
    detection: Detection
    first_frame: int
    last_frame: int
    first_seen: datetime | None = None
    first_pts_s: float | None = None
    hits: int = 1
    missed: int = 0
    velocity: tuple[float, float] = (0.0, 0.0)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def matched(self) -> bool:
        """Whether the track was updated by a detection in the latest frame."""
        return self.missed == 0

    def predicted_box(self, frames_ahead: int = 1) -> Box:
        dx, dy = self.velocity[0] * frames_ahead, self.velocity[1] * frames_ahead
        x1, y1, x2, y2 = self.box
        return (x1 + dx, y1 + dy, x2 + dx, y2 + dy)


class Tracker:
    """Greedy IoU + centre-distance tracker."""

    def __init__(
        self,
        *,
        max_missed: int = 8,
        min_iou: float = 0.1,
        max_center_dist: float = 1.0,
        velocity_smoothing: float = 0.5,
        max_size_ratio: float = 1.3,
    ) -> None:
        """``max_center_dist``: the largest centre distance accepted, in face widths;
        ``max_missed``: frames a track survives without a detection; ``max_size_ratio``: the
        largest change of face width from one frame to the next."""
        self.max_missed = max_missed
        self.min_iou = min_iou
        self.max_center_dist = max_center_dist
        self.alpha = velocity_smoothing
        self.max_size_ratio = max_size_ratio
        self._ids = itertools.count(1)
        self.tracks: list[Track] = []
        self.expired: list[Track] = []
        self.total_tracks = 0

    def _cost(self, tracks: Sequence[Track], dets: Sequence[Detection],
              frame_index: int) -> np.ndarray:
        gaps_list = [max(1, frame_index - t.last_frame) for t in tracks]
        pred = np.array([t.predicted_box(g) for t, g in zip(tracks, gaps_list, strict=True)],
                        dtype=np.float32)
        boxes = np.array([d.box for d in dets], dtype=np.float32)
        iou = iou_matrix(pred, boxes)
        pc = np.stack([(pred[:, 0] + pred[:, 2]) / 2, (pred[:, 1] + pred[:, 3]) / 2], axis=1)
        dc = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
        size = np.maximum(
            ((pred[:, 2] - pred[:, 0]) + (pred[:, 3] - pred[:, 1]))[:, None] / 2,
            ((boxes[:, 2] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 1]))[None, :] / 2,
        )
        dist = np.linalg.norm(pc[:, None, :] - dc[None, :, :], axis=2) / np.maximum(size, 1.0)
        # size ratio: a face grows or shrinks by a few % per frame, not by a third (that is
        # another face, e.g. after a cut); more latitude after missed frames
        wt = (pred[:, 2] - pred[:, 0])[:, None]
        wd = (boxes[:, 2] - boxes[:, 0])[None, :]
        ratio = np.maximum(wt, wd) / np.maximum(np.minimum(wt, wd), 1.0)
        gaps = np.array(gaps_list, dtype=np.float32)[:, None]
        max_ratio = np.minimum(self.max_size_ratio ** gaps, 2.0)
        cost = (1.0 - iou) + dist
        allowed = ((iou >= self.min_iou) | (dist <= self.max_center_dist)) & (ratio < max_ratio)
        return np.where(allowed, cost, np.inf)

    def update(
        self,
        detections: Sequence[Detection],
        frame_index: int,
        *,
        at: datetime | None = None,
        pts_s: float | None = None,
    ) -> list[Track]:
        """Associate one frame's detections; returns the live tracks (matched ones have
        ``missed == 0``). Tracks that expired in this call are in :attr:`expired` until the
        next call. Frames without detection in between (a detection schedule) simply do not
        call this: a track expires when no detection matched it for more than ``max_missed``
        frames."""
        self.expired = []
        tracks = self.tracks
        matched_t: set[int] = set()
        matched_d: set[int] = set()
        if tracks and detections:
            cost = self._cost(tracks, detections, frame_index)
            order = np.argsort(cost, axis=None)
            for flat in order:
                ti, di = divmod(int(flat), len(detections))
                if not np.isfinite(cost[ti, di]):
                    break
                if ti in matched_t or di in matched_d:
                    continue
                matched_t.add(ti)
                matched_d.add(di)
                self._apply(tracks[ti], detections[di], frame_index)
        live: list[Track] = []
        for i, track in enumerate(tracks):
            if i not in matched_t:
                track.missed += 1
                if frame_index - track.last_frame > self.max_missed:
                    self.expired.append(track)
                    continue
            live.append(track)
        for di, det in enumerate(detections):
            if di in matched_d:
                continue
            live.append(Track(
                track_id=next(self._ids), box=det.box, detection=det, first_frame=frame_index,
                last_frame=frame_index, first_seen=at, first_pts_s=pts_s,
            ))
            self.total_tracks += 1
        self.tracks = live
        return live

    def _apply(self, track: Track, det: Detection, frame_index: int) -> None:
        gap = max(1, frame_index - track.last_frame)
        (ox, oy), (nx, ny) = _center(track.box), _center(det.box)
        vx, vy = (nx - ox) / gap, (ny - oy) / gap
        a = self.alpha
        track.velocity = (a * vx + (1 - a) * track.velocity[0],
                          a * vy + (1 - a) * track.velocity[1])
        track.box = det.box
        track.detection = det
        track.last_frame = frame_index
        track.hits += 1
        track.missed = 0

    def cut(self) -> list[Track]:
        """A camera cut: every track ends here (returned, and in :attr:`expired` until the
        next update); faces after the cut start new tracks."""
        ended = self.tracks
        self.expired, self.tracks = self.expired + ended, []
        return ended

    def split(self, track: Track, *, at: datetime | None = None,
              pts_s: float | None = None) -> int:
        """The face of ``track`` is another person from now on: a new id, a new start, the
        same box (returns the old id)."""
        old = track.track_id
        track.track_id = next(self._ids)
        track.first_frame = track.last_frame
        track.first_seen, track.first_pts_s = at, pts_s
        track.hits = 1
        track.data = {}
        self.total_tracks += 1
        return old

    def flush(self) -> list[Track]:
        """End every track (end of a video): returns them, as if they had expired."""
        self.expired, self.tracks = self.tracks, []
        return self.expired


def _center(box: Box) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


class CutDetector:
    """Shot cuts from consecutive frames: a cut changes the whole picture at once, both its
    colours (Bhattacharyya distance of hue-saturation histograms of a 64x36 thumbnail) and its
    layout (mean absolute difference of the grey thumbnails). Both must jump: a person walking
    close to the camera changes the layout but hardly the colours; light switched on changes
    brightness, not hue and saturation.

    Thresholds measured on the montage test video (15 cuts: histogram >= 0.29, grey >= 23) and
    on the Hamilton and walking clips (every frame that is not a cut: histogram <= 0.21, grey
    <= 14; Hamilton's 3 real cuts: >= 0.41 and >= 27)."""

    SIZE = (64, 36)

    def __init__(self, hist_threshold: float = 0.25, grey_threshold: float = 18.0) -> None:
        self.hist_threshold = hist_threshold
        self.grey_threshold = grey_threshold
        self._prev: tuple[np.ndarray, np.ndarray] | None = None
        self.cuts = 0

    def _signature(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # every frame, so it must stay cheap at 720p: a pixel-subsampled copy at most 4x the
        # thumbnail first (area-averaging a whole 1280x720 frame cost ~1 ms per frame here)
        step = max(1, min(image.shape[1] // (4 * self.SIZE[0]),
                          image.shape[0] // (4 * self.SIZE[1])))
        if step > 1:
            image = np.ascontiguousarray(image[::step, ::step])
        small = cv2.resize(image, self.SIZE, interpolation=cv2.INTER_AREA)
        if small.ndim == 2:
            small = cv2.cvtColor(small, cv2.COLOR_GRAY2BGR)
        hsv = cv2.cvtColor(small, cv2.COLOR_BGR2HSV)
        hist = cv2.calcHist([hsv], [0, 1], None, [16, 8], [0, 180, 0, 256])
        cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float32)
        return hist, grey

    def update(self, image: np.ndarray) -> bool:
        """True when ``image`` starts a new shot (never for the first frame)."""
        sig = self._signature(image)
        prev, self._prev = self._prev, sig
        if prev is None:
            return False
        hist = cv2.compareHist(prev[0], sig[0], cv2.HISTCMP_BHATTACHARYYA)
        grey = float(np.abs(prev[1] - sig[1]).mean())
        cut = hist >= self.hist_threshold and grey >= self.grey_threshold
        self.cuts += cut
        return cut
