"""A TV-style montage built at test time from ``FACES_DIR`` (never committed): shots of 1-3 s,
one or two faces each, framed alike (same place, same size), cut to cut between different
people, about half a minute at 25 fps.

Four people of the deepface set are enrolled (2 photos each); their *other* photos appear in
the montage among five people who are never enrolled. Each shot slowly zooms in (2-8 %) and
pans, so consecutive frames differ as in a real video. The faces sit exactly where the previous
shot's faces were: a tracker that only looks at boxes carries its tracks across the cut.

``python -m bench.montage OUT.mp4`` writes one to look at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

_LOGGER = logging.getLogger(__name__)

SEED = 20261201
WIDTH, HEIGHT, FPS = 640, 360, 25.0
TILE = 300  # a face tile is TILE x TILE; the face is ~TILE / CONTEXT wide
CONTEXT = 2.6  # tile side / face width
ENROLLED = ("angelina_jolie", "katy_perry", "mark_zuckerberg", "matt_damon")
STRANGERS = ("jennifer_aniston", "scarlett_johansson", "jack_dorsey", "leonardo_dicaprio",
             "george_clooney")
ENROLL_PHOTOS = 2
SHOTS = 16


@dataclass
class Shot:
    people: list[str]
    photos: list[Path]
    start_s: float
    seconds: float


@dataclass
class Montage:
    video: Path
    enrolled: dict[str, list[Path]]  # person -> photos to enrol
    shots: list[Shot] = field(default_factory=list)

    @property
    def enrolled_in_video(self) -> set[str]:
        return {p for s in self.shots for p in s.people if p in self.enrolled}

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.shots)


def identities(faces_dir: Path) -> dict[str, list[Path]]:
    ds = faces_dir / "deepface" / "tests" / "unit" / "dataset"
    out: dict[str, list[Path]] = {}
    for line in (faces_dir / "deepface" / "identities.csv").read_text().splitlines()[1:]:
        name, files, *_ = line.split(",")
        # img11_reflection is a mirrored copy, ../ files are outside the set, img47 is WebP
        out[name] = [ds / f for f in files.split()
                     if "/" not in f and "reflection" not in f]
    return out


def _face_tile(image: np.ndarray, box: tuple[float, float, float, float], zoom: float,
               pan: tuple[float, float]) -> np.ndarray:
    """A TILE x TILE view centred on the face (plus ``pan`` in face widths), the face
    ``zoom`` times larger than at the shot's start."""
    x1, y1, x2, y2 = box
    w = x2 - x1
    cx, cy = (x1 + x2) / 2 + pan[0] * w, (y1 + y2) / 2 + pan[1] * w
    side = CONTEXT * w / zoom
    scale = TILE / side
    matrix = np.array([[scale, 0, TILE / 2 - scale * cx], [0, scale, TILE / 2 - scale * cy]],
                      np.float32)
    return cv2.warpAffine(image, matrix, (TILE, TILE), flags=cv2.INTER_AREA,
                          borderMode=cv2.BORDER_REPLICATE)


def _shot_order(rng: np.random.Generator) -> list[list[str]]:
    """Who is in each shot: alternate enrolled / stranger so that every cut changes the
    person; every enrolled person appears at least twice; some shots show two people side by
    side."""
    order: list[list[str]] = []
    enrolled_cycle = list(ENROLLED) * 2
    rng.shuffle(enrolled_cycle)
    strangers_cycle = list(STRANGERS) * 3
    rng.shuffle(strangers_cycle)
    for k in range(SHOTS):
        cycle = enrolled_cycle if k % 2 == 0 and enrolled_cycle else strangers_cycle
        first = cycle.pop()
        shot = [first]
        if k % 5 == 3:  # a two-face shot: the other one a stranger
            shot.append(next(s for s in strangers_cycle if s != first))
        order.append(shot)
    return order


def _frame(faces: list[tuple[np.ndarray, tuple[float, float, float, float]]],
           centres: list[int], zoom: float, pan: tuple[float, float]) -> np.ndarray:
    """One frame of a shot: each (image, face box) as a tile centred at its x."""
    canvas = np.full((HEIGHT, WIDTH, 3), 40, np.uint8)
    for (image, box), cx in zip(faces, centres, strict=True):
        tile = _face_tile(image, box, zoom, pan)
        if len(faces) == 2:
            tile = cv2.resize(tile, (WIDTH // 2 - 20, WIDTH // 2 - 20),
                              interpolation=cv2.INTER_AREA)
        th, tw = tile.shape[:2]
        y0, x0 = (HEIGHT - th) // 2, cx - tw // 2
        canvas[y0:y0 + th, x0:x0 + tw] = tile
    return canvas


def build(faces_dir: Path, out: Path, model_dir: Path, seed: int = SEED) -> Montage:
    """Write the montage to ``out`` (mp4) and return what is in it."""
    from appliance.vision.enroll import detect_still, enrollment_detector, load_image

    people = identities(faces_dir)
    rng = np.random.default_rng(seed)
    enrolled: dict[str, list[Path]] = {}
    pool: dict[str, list[Path]] = {}
    for name in ENROLLED:
        photos = people[name]
        chosen = set(rng.choice(len(photos), ENROLL_PHOTOS, replace=False).tolist())
        enrolled[name] = [p for i, p in enumerate(photos) if i in chosen]
        pool[name] = [p for i, p in enumerate(photos) if i not in chosen]
    for name in STRANGERS:
        pool[name] = list(people[name])

    detector = enrollment_detector(model_dir)
    boxes: dict[Path, tuple[np.ndarray, tuple[float, float, float, float]]] = {}

    def face_of(path: Path) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
        if path not in boxes:
            image = load_image(path)
            dets = [d for d in detect_still(image, detector) if d.width >= 40]
            if len(dets) != 1:
                return None
            boxes[path] = (image, dets[0].box)
        return boxes[path]

    for name in list(pool):
        pool[name] = [p for p in pool[name] if face_of(p) is not None]

    order = _shot_order(rng)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write {out}")
    montage = Montage(out, enrolled)
    used: dict[str, int] = {}
    t = 0.0
    try:
        for names in order:
            photos = []
            for name in names:
                options = pool[name]
                photos.append(options[used.get(name, 0) % len(options)])
                used[name] = used.get(name, 0) + 1
            seconds = float(rng.choice([1.0, 1.5, 2.0, 2.5, 3.0]))
            frames = round(seconds * FPS)
            zoom_to = 1.0 + float(rng.uniform(0.02, 0.08))
            pan_to = (float(rng.uniform(-0.08, 0.08)), float(rng.uniform(-0.05, 0.05)))
            centres = [WIDTH // 2] if len(photos) == 1 else [WIDTH // 4 + 5, 3 * WIDTH // 4 - 5]
            for f in range(frames):
                a = f / max(1, frames - 1)
                faces = []
                for path in photos:
                    found = face_of(path)
                    assert found is not None
                    faces.append(found)
                writer.write(_frame(faces, centres, 1.0 + a * (zoom_to - 1.0),
                                    (a * pan_to[0], a * pan_to[1])))
            montage.shots.append(Shot(names, photos, t, frames / FPS))
            t += frames / FPS
    finally:
        writer.release()
    _LOGGER.info("montage %s: %d shots, %.1f s", out, len(montage.shots), montage.seconds)
    return montage


def enrolment_clip(path: Path, photos: list[Path], size: int = 480) -> None:
    """A few seconds 'facing the camera' for enrolment tests: each photo held 1 s with a slow
    zoom (as a phone clip of a face turning a little), 25 fps, ``size`` x ``size``."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (size, size))
    try:
        for photo in photos:
            image = cv2.imread(str(photo))
            h, w = image.shape[:2]
            for f in range(round(FPS)):
                scale = size / max(h, w) * (1.0 + 0.004 * f)
                matrix = np.array([[scale, 0, size / 2 - scale * w / 2],
                                   [0, scale, size / 2 - scale * h / 2]], np.float32)
                writer.write(cv2.warpAffine(image, matrix, (size, size),
                                            borderMode=cv2.BORDER_REPLICATE))
    finally:
        writer.release()


if __name__ == "__main__":
    import os
    import sys

    from models import DEFAULT_MODEL_DIR

    root = Path(os.environ.get("FACES_DIR", Path(__file__).resolve().parents[2] / "shared" /
                               "faces"))
    m = build(root, Path(sys.argv[1]), DEFAULT_MODEL_DIR)
    for shot in m.shots:
        print(f"{shot.start_s:5.1f} s  {shot.seconds:.1f} s  {' + '.join(shot.people)}")
    print(f"enrolled in the video: {sorted(m.enrolled_in_video)}")
