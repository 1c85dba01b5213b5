"""Door benchmark: faces at the sizes a camera above a classroom door sees them.

The lfw_dev benchmark people (the split of :mod:`bench.recognition`, never used for tuning):
50 roster people enrolled with 2 photos each (the product's enrolment code), their other
photos as probes, and one photo of each of 300 people never enrolled as strangers. Every probe
and stranger photo is shrunk so its face is 24/32/40/50/60/70/80 px wide and pasted into a
1280x720 and a 640x480 frame of a real scene (a frame of the walking-strangers clip; the photo
goes in the upper part, where the scene has no faces), with sensor-like noise and JPEG quality
75. Face width = the BlazeFace full-range box of the face in the original photo (about 16 cm
of a real face: the unit docs/OPERATIONS.md's placement guide uses; YuNet's box is ~0.85 of it).

The shipped variant does what the pipeline does before a descriptor: a face that was small in
YuNet's scaled-down input is detected again on its full-resolution crop
(``detector.refine_landmarks``) and the quality gate judges it on those landmarks only.

Per detector variant, frame size and face size: detection recall (a detection centred in the
pasted face), and for the variants that identify, what the pipeline does with the face: the
quality gate (``recognition.min_quality``), the crop from the full-resolution frame, the
configured embedder, the matcher at the shipped threshold and margin: identified correctly,
as the wrong student, strangers accepted. Detection ms per frame per variant; and
face_recognition's per-frame loop (HOG + encodings + compare_faces 0.5) on a subset of the
same frames, in the same run.

    python -m bench door            # part of `make bench`
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench.recognition import faces_dir, lfw_split

_LOGGER = logging.getLogger(__name__)

SIZES = (24, 32, 40, 50, 60, 70, 80)
FRAMES = {"720p": (1280, 720), "480p": (640, 480)}
BACKGROUND_CLIP = "walking/strangers_walking_1080p.mp4"
BACKGROUND_FRAMES = (0, 26, 52, 78, 104)
UPPER_PART = 0.42  # the pasted photo stays above this share of the frame height
NOISE_SIGMA = 2.0
JPEG_QUALITY = 75
SEED = 20261207
SUBSET_EVERY = 4  # the comparison variants see every 4th frame of each cell
BASELINE_FRAMES = 10  # face_recognition: this many probes and as many strangers per cell
BASELINE_TOLERANCE = 0.5
# Done-when targets of issue 22 at the shipped defaults
TARGETS = {("720p", 70): 0.95, ("720p", 50): 0.90, ("480p", 50): 0.90}
MAX_FAR = 0.01


@dataclass(frozen=True)
class Variant:
    """One detector configuration; ``shipped`` = the settings' own ``detector`` section."""

    name: str
    model: str = "yunet"
    options: dict[str, int] = field(default_factory=dict)
    identify: bool = True
    shipped: bool = False
    refine: bool = True  # detector.refine_landmarks where the detector has it
    note: str = ""


VARIANTS = (
    Variant("shipped", shipped=True, note="the configured defaults (detector + recognition)"),
    Variant("shipped_no_refine", "yunet", {"input_width": 640, "min_face_px": 24},
            refine=False, note="YuNet on a 640 px copy without detector.refine_landmarks"),
    Variant("yunet_full_res", "yunet", {"input_width": 0, "min_face_px": 24},
            note="YuNet on the whole full-resolution frame"),
    Variant("yunet_480", "yunet", {"input_width": 480, "min_face_px": 24},
            note="YuNet on a 480 px wide copy"),
    Variant("blazeface_before", "full_range", {"min_face_px": 40},
            note="BlazeFace full range, no tiles, min 40 px: the defaults before issue 22"),
    Variant("blazeface_tiles3", "full_range", {"tiles": 3, "min_face_px": 24},
            note="BlazeFace full range on 3 tiles per row + the whole frame, min 24 px"),
)


@dataclass(frozen=True)
class Item:
    label: str | None  # student id (probe) or None (stranger)
    path: str
    ref_box: tuple[float, float, float, float]  # face box in the original photo


# ------------------------------------------------------------------ frames


def backgrounds(root: Path) -> dict[str, list[np.ndarray]]:
    """Real-scene frames per frame size (16:9 scaled; 4:3 centre-cropped, then scaled)."""
    cap = cv2.VideoCapture(str(root / BACKGROUND_CLIP))
    raw = []
    index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index in BACKGROUND_FRAMES:
            raw.append(frame)
        index += 1
    cap.release()
    if not raw:
        raise FileNotFoundError(f"{root / BACKGROUND_CLIP}: no frames")
    out: dict[str, list[np.ndarray]] = {}
    for name, (w, h) in FRAMES.items():
        frames = []
        for frame in raw:
            fh, fw = frame.shape[:2]
            crop_w = min(fw, round(fh * w / h))
            x0 = (fw - crop_w) // 2
            frames.append(cv2.resize(frame[:, x0:x0 + crop_w], (w, h),
                                     interpolation=cv2.INTER_AREA))
        out[name] = frames
    return out


def render(photo: np.ndarray, ref_box: tuple[float, float, float, float], face_px: int,
           background: np.ndarray, rng: np.random.Generator
           ) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The photo shrunk so its face is ``face_px`` wide, pasted at a random place of the
    background's upper part, with noise and JPEG compression; (frame, true face box)."""
    scale = face_px / max(1.0, ref_box[2] - ref_box[0])
    small = cv2.resize(photo, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ph, pw = small.shape[:2]
    h, w = background.shape[:2]
    x = int(rng.integers(0, max(1, w - pw)))
    y = int(rng.integers(0, max(1, int(UPPER_PART * h) - ph)))
    frame = background.copy()
    frame[y:y + ph, x:x + pw] = small[: h - y, : w - x]
    noisy = frame.astype(np.float32) + rng.normal(0.0, NOISE_SIGMA, frame.shape)
    frame = np.clip(noisy, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    frame = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    box = (x + ref_box[0] * scale, y + ref_box[1] * scale,
           x + ref_box[2] * scale, y + ref_box[3] * scale)
    return frame, box


def hit(box: tuple[float, float, float, float], truth: tuple[float, float, float, float]
        ) -> bool:
    """A detection of the pasted face: centred in its box, of a plausible size."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    tw = truth[2] - truth[0]
    inside = truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3]
    return inside and 0.5 * tw <= box[2] - box[0] <= 2.0 * tw


# ------------------------------------------------------------------ workers

_STATE: dict[str, Any] = {}


def _init(model_dir: str, root: str) -> None:
    from appliance.config import load
    from appliance.vision.detectors import create_detector, detector_from_config
    from appliance.vision.embedding import create_embedder

    logging.disable(logging.INFO)
    cv2.setNumThreads(1)
    settings = load()
    md = Path(model_dir)
    detectors = {}
    for v in VARIANTS:
        if v.shipped:
            cfg = settings.detector.model_copy(update={"threads": 1})
            detectors[v.name] = detector_from_config(cfg, md)
        else:
            detectors[v.name] = create_detector(md, v.model, threads=1, **v.options)
    _STATE.update(settings=settings, detectors=detectors, backgrounds=backgrounds(Path(root)),
                  embedder=create_embedder(settings.recognition.embedder, md))


def _cell(job: tuple[str, int, list[Item], int]) -> list[dict[str, Any]]:
    """One frame size x face size x chunk of items: per item and variant, what happened."""
    from appliance.pipeline import crop_for_embedding, refine_for_embedding
    from appliance.vision.enroll import load_image
    from appliance.vision.quality import face_quality

    res, face_px, items, offset = job
    settings = _STATE["settings"]
    min_quality = settings.recognition.min_quality
    rng = np.random.default_rng([SEED, face_px, offset, len(res)])
    bgs = _STATE["backgrounds"][res]
    out = []
    for i, item in enumerate(items):
        photo = load_image(Path(item.path))
        frame, truth = render(photo, item.ref_box, face_px, bgs[(offset + i) % len(bgs)], rng)
        row: dict[str, Any] = {"label": item.label}
        for v in VARIANTS:
            if not v.shipped and (offset + i) % SUBSET_EVERY:
                continue
            t0 = time.perf_counter()
            dets = _STATE["detectors"][v.name].detect(frame)
            ms = (time.perf_counter() - t0) * 1e3
            found = [d for d in dets if hit(d.box, truth)]
            r: dict[str, Any] = {"ms": ms, "detected": bool(found), "gated": False,
                                 "embedding": None}
            if found and v.identify:
                det = found[0]
                r["gated"] = face_quality(frame, det) >= min_quality
                crop, moved = crop_for_embedding(frame, det)
                detector = _STATE["detectors"][v.name]
                if (v.refine and settings.detector.refine_landmarks
                        and hasattr(detector, "needs_refine")
                        and detector.needs_refine(det, frame.shape[1])):
                    # as the pipeline does before a descriptor: landmarks from the
                    # full-resolution crop, the gate on them only (not on the coarse ones)
                    refined = refine_for_embedding(detector, crop, moved, face_quality,
                                                   min_quality)
                    r["refined"] = True
                    r["gated"] = refined is not None
                    if refined is not None:
                        moved = refined[0]
                r["embedding"] = _STATE["embedder"].embed(crop, [moved])[0]
            row[v.name] = r
        out.append(row)
    return out


def _baseline_cell(job: tuple[str, int, list[Item], int]) -> list[dict[str, Any]]:
    import face_recognition

    from appliance.vision.enroll import load_image

    res, face_px, items, offset = job
    rng = np.random.default_rng([SEED, face_px, offset, len(res)])
    bgs = _STATE["backgrounds"][res]
    out = []
    for i, item in enumerate(items):
        frame, truth = render(load_image(Path(item.path)), item.ref_box, face_px,
                              bgs[(offset + i) % len(bgs)], rng)
        t0 = time.perf_counter()
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        locations = face_recognition.face_locations(rgb)
        encodings = face_recognition.face_encodings(rgb, locations)
        ms = (time.perf_counter() - t0) * 1e3
        enc = None
        for (top, right, bottom, left), e in zip(locations, encodings, strict=True):
            if hit((left, top, right, bottom), truth):
                enc = np.asarray(e, np.float32)
                break
        out.append({"label": item.label, "ms": ms, "detected": enc is not None,
                    "embedding": enc})
    return out


# ------------------------------------------------------------------ set-up and scoring


def reference_boxes(paths: list[Path], model_dir: Path) -> dict[Path, tuple[float, ...]]:
    """Each photo's face box (BlazeFace full range, the central face): the size unit."""
    from appliance.vision.enroll import detect_still, enrollment_detector, load_image

    detector = enrollment_detector(model_dir, "full_range")
    out: dict[Path, tuple[float, ...]] = {}
    for path in paths:
        image = load_image(path)
        dets = detect_still(image, detector)
        if not dets:
            continue
        h, w = image.shape[:2]
        det = min(dets, key=lambda d: (d.center[0] - w / 2) ** 2 + (d.center[1] - h / 2) ** 2)
        out[path] = tuple(float(v) for v in det.box)
    return out


def enrol(enroll: dict[str, list[Path]], model_dir: Path, detector_model: str) -> Any:
    """The roster: as in bench.recognition, the central face of each enrolment photo with the
    product's enrolment detector, embedder and jitters (so the door figures compare with the
    close-up ones). Also counts the photos `appliance roster build` would refuse (a
    background face beside the student's: "2 faces"), a school would retake those."""
    from appliance.config import load
    from appliance.recognition import Roster
    from appliance.vision.embedding import create_embedder, embedder_id
    from appliance.vision.enroll import (
        ENROLL_JITTERS,
        detect_still,
        embed_photo,
        enrollment_detector,
        load_image,
    )
    from cloud_sync.protocol import RosterEntry

    settings = load()
    name = settings.recognition.embedder
    detector = enrollment_detector(model_dir, detector_model)
    embedder = create_embedder(name, model_dir, detector_model=detector_model)
    entries, failed = [], 0
    for sid in sorted(enroll):
        vectors = []
        for photo in enroll[sid]:
            image = load_image(photo)
            failed += not embed_photo(image, detector, embedder).ok
            dets = detect_still(image, detector)
            if not dets:
                continue
            h, w = image.shape[:2]
            det = min(dets, key=lambda d: (d.center[0] - w / 2) ** 2
                      + (d.center[1] - h / 2) ** 2)
            vectors.append(embedder.embed(image, [det], num_jitters=ENROLL_JITTERS)[0].tolist())
        if vectors:
            entries.append(RosterEntry(student_id=sid, name=sid, embeddings=vectors))
    return Roster.from_entries(entries, embedder_id(name)), failed


def score(rows: list[dict[str, Any]], matcher: Any) -> dict[str, Any]:
    probes = [r for r in rows if r["label"] is not None]
    strangers = [r for r in rows if r["label"] is None]
    out: dict[str, Any] = {
        "frames": len(rows), "probes": len(probes), "strangers": len(strangers),
        "detection_recall": round(sum(r["detected"] for r in rows) / max(1, len(rows)), 4),
    }
    if matcher is None:
        return out
    embedded = [r for r in rows if r["embedding"] is not None]
    ids: list[str | None] = [None] * len(embedded)
    if embedded:
        matches = matcher.match(np.stack([r["embedding"] for r in embedded]).astype(np.float32))
        ids = [m.student_id for m in matches]
    ungated = {id(r): s for r, s in zip(embedded, ids, strict=True)}
    # what the pipeline does with this one crop: no descriptor below recognition.min_quality
    gated = {id(r) for r in embedded if r.get("gated", True)}
    got = {k: s for k, s in ungated.items() if k in gated}
    correct = sum(1 for r in probes if got.get(id(r)) == r["label"])
    wrong = sum(1 for r in probes if got.get(id(r)) not in (None, r["label"]))
    accepted = sum(1 for r in strangers if got.get(id(r)) is not None)
    out.update({
        # the same crops without the gate (a track offers several crops; the gate picks)
        "identified_without_gate": round(
            sum(1 for r in probes if ungated.get(id(r)) == r["label"]) / max(1, len(probes)), 4),
        "strangers_accepted_without_gate": sum(1 for r in strangers
                                               if ungated.get(id(r)) is not None),
        "passed_quality_gate": round(sum(bool(r.get("gated")) for r in rows)
                                     / max(1, len(rows)), 4),
        "identified_correctly": round(correct / max(1, len(probes)), 4),
        "identified_as_wrong_student": round(wrong / max(1, len(probes)), 4),
        "wrong_student_count": wrong,
        "stranger_false_accept_rate": round(accepted / max(1, len(strangers)), 4),
        "strangers_accepted": accepted,
    })
    return out


def _chunks(items: list[Item], n: int) -> list[tuple[list[Item], int]]:
    return [(items[i:i + n], i) for i in range(0, len(items), n)]


def run() -> dict[str, Any]:
    from appliance.config import load
    from appliance.recognition import Matcher
    from appliance.vision.embedding import spec

    root = faces_dir()
    settings = load()
    model_dir = settings.paths.model_dir
    split = lfw_split(root / "lfw_dev")
    probe_paths = [(sid, p) for sid in sorted(split.probes) for p in split.probes[sid]]
    stranger_paths = [(None, photos[0]) for _, photos in sorted(split.strangers.items())]
    refs = reference_boxes([p for _, p in probe_paths + stranger_paths], model_dir)
    items = [Item(label, str(p), refs[p]) for label, p in probe_paths + stranger_paths
             if p in refs]
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(items))
    items = [items[i] for i in order]  # probes and strangers mixed in every chunk
    limit = int(os.environ.get("BENCH_DOOR_LIMIT", "0"))  # a quick look while developing
    if limit:
        items = items[:limit]

    rcfg = settings.recognition
    emb_spec = spec(rcfg.embedder)
    matchers: dict[str, Any] = {}
    enrol_failures: dict[str, int] = {}
    for model in sorted({settings.detector.model} | {v.model for v in VARIANTS if not v.shipped}):
        roster, failed = enrol(split.enroll, model_dir, model)
        matchers[model] = Matcher(roster, rcfg.match_threshold(), rcfg.match_margin(),
                                  metric=emb_spec.metric)
        enrol_failures[model] = failed

    jobs = [(res, px, chunk, off) for res in FRAMES for px in SIZES
            for chunk, off in _chunks(items, 40)]
    workers = max(1, min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, initializer=_init,
                             initargs=(str(model_dir), str(root))) as pool:
        results = list(pool.map(_cell, jobs))
        base_items = ([i for i in items if i.label is not None][:BASELINE_FRAMES]
                      + [i for i in items if i.label is None][:BASELINE_FRAMES])
        base_jobs = [(res, px, base_items, 0) for res in FRAMES for px in SIZES]
        base_results = list(pool.map(_baseline_cell, base_jobs))
    seconds = time.perf_counter() - t0

    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for (res, px, _, _), rows in zip(jobs, results, strict=True):
        cells.setdefault((res, px), []).extend(rows)
    variants_out: dict[str, Any] = {}
    for v in VARIANTS:
        model = settings.detector.model if v.shipped else v.model
        per: dict[str, Any] = {}
        ms_by_res: dict[str, list[float]] = {}
        for (res, px), rows in cells.items():
            picked = [{"label": r["label"], **r[v.name]} for r in rows if v.name in r]
            per.setdefault(res, {})[str(px)] = score(picked, matchers[model] if v.identify
                                                     else None)
            ms_by_res.setdefault(res, []).extend(r["ms"] for r in picked)
        variants_out[v.name] = {
            "model": model, "note": v.note,
            "options": (settings.detector.model_dump() if v.shipped else v.options),
            "detect_ms_per_frame": {res: round(float(np.median(ms)), 2)
                                    for res, ms in ms_by_res.items()},
            "sizes": per,
        }

    baseline = _score_baseline(split, base_jobs, base_results)
    walkthrough = _walkthroughs(root, model_dir)
    shipped = variants_out["shipped"]["sizes"]
    checks = {}
    for (res, px), goal in TARGETS.items():
        s = shipped[res][str(px)]
        checks[f"{res}_{px}px"] = {
            "identified_correctly": s["identified_correctly"], "goal": goal,
            "wrong_students": s["wrong_student_count"],
            "strangers_accepted": s["stranger_false_accept_rate"],
            "met": (s["identified_correctly"] >= goal and s["wrong_student_count"] == 0
                    and s["stranger_false_accept_rate"] <= MAX_FAR),
        }
    return {
        "people": {"roster": len(split.enroll),
                   "enrolment_photos_roster_build_refuses": enrol_failures,
                   "probe_photos": sum(1 for i in items if i.label is not None),
                   "stranger_photos": sum(1 for i in items if i.label is None)},
        "frames": {k: f"{w}x{h}" for k, (w, h) in FRAMES.items()},
        "threshold": rcfg.match_threshold(), "margin": rcfg.match_margin(),
        "embedder": rcfg.embedder, "min_quality": rcfg.min_quality,
        "variants": variants_out,
        "baseline_face_recognition": baseline,
        "walkthrough": walkthrough,
        "targets": checks,
        "targets_met": all(c["met"] for c in checks.values()),
        "seconds": round(seconds, 1),
        "cpu_count": os.cpu_count(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def _walkthroughs(root: Path, model_dir: Path) -> dict[str, Any]:
    """bench/walkthrough.py at the shipped defaults and with the detector before issue 22."""
    import tempfile

    from bench import walkthrough

    out: dict[str, Any] = {}
    for name, overrides in (("shipped", None),
                            ("blazeface_before", {"model": "full_range", "min_face_px": 40,
                                                 "detect_every_frames": 1})):
        with tempfile.TemporaryDirectory(prefix="bench-walk-") as tmp:
            result = walkthrough.run(root, model_dir, Path(tmp), overrides)
        result.pop("placement", None)
        out[name] = result
    return out


def _score_baseline(split: Any, jobs: list[Any], results: list[list[dict[str, Any]]]
                    ) -> dict[str, Any]:
    """compare_faces at tolerance 0.5 against face_recognition's own encodings of the
    enrolment photos (closest matching photo wins)."""
    import face_recognition

    known_names, known = [], []
    for sid in sorted(split.enroll):
        for photo in split.enroll[sid]:
            image = face_recognition.load_image_file(str(photo))
            enc = face_recognition.face_encodings(image)
            if enc:
                known_names.append(sid)
                known.append(enc[0])
    per: dict[str, Any] = {}
    ms: dict[str, list[float]] = {}
    for (res, px, _, _), rows in zip(jobs, results, strict=True):
        probes = [r for r in rows if r["label"] is not None]
        strangers = [r for r in rows if r["label"] is None]

        def ident(r: dict[str, Any]) -> str | None:
            if r["embedding"] is None:
                return None
            hits = face_recognition.compare_faces(known, r["embedding"],
                                                  tolerance=BASELINE_TOLERANCE)
            if not any(hits):
                return None
            dist = np.where(hits, face_recognition.face_distance(known, r["embedding"]), np.inf)
            return known_names[int(np.argmin(dist))]

        correct = sum(1 for r in probes if ident(r) == r["label"])
        wrong = sum(1 for r in probes if ident(r) not in (None, r["label"]))
        accepted = sum(1 for r in strangers if ident(r) is not None)
        per.setdefault(res, {})[str(px)] = {
            "frames": len(rows),
            "detection_recall": round(sum(r["detected"] for r in rows) / max(1, len(rows)), 4),
            "identified_correctly": round(correct / max(1, len(probes)), 4),
            "identified_as_wrong_student": round(wrong / max(1, len(probes)), 4),
            "stranger_false_accept_rate": round(accepted / max(1, len(strangers)), 4),
        }
        ms.setdefault(res, []).extend(r["ms"] for r in rows)
    return {"tolerance": BASELINE_TOLERANCE,
            "note": "HOG face_locations + face_encodings + compare_faces, every frame",
            "ms_per_frame": {res: round(float(np.median(v)), 1) for res, v in ms.items()},
            "sizes": per}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
