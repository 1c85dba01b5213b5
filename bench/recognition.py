"""Recognition quality, open set, on ``lfw_dev``: our pipeline against face_recognition's own.

``python -m bench recognition`` (part of ``make bench``). With a fixed seed, 50 people having at
least 3 photos are the roster (2 photos each enrolled), all their other photos are probes, and
300 other people (all their photos) are strangers. The remaining ~109 people are the only ones
thresholds, margins and the box calibration were tuned on (``tune()`` below, never run by the
benchmark itself).

Our pipeline per photo: BlazeFace full range (the device default; score >= 0.5 for these
150x150 crops) -> the face nearest the image centre (LFW photos are centred on their subject;
some show other people behind) -> calibrated box -> dlib 5-point alignment + 128-d descriptor ->
Matcher(threshold, margin) with the defaults of ``RecognitionConfig`` (students as descriptor
centroids). Roster photos are embedded as enrolment does it (``appliance.vision.enroll``:
``ENROLL_JITTERS`` jittered descriptors averaged); one descriptor per probe, as the device
computes per sample (flip-averaged probes, ``FaceEmbedder(flip_average=True)``, double the cost
and were left out: see docs/RECOGNITION.md).

Baseline, same split, same run: face_recognition.face_locations (HOG) + face_encodings +
compare_faces at tolerance 0.6 and 0.5; a probe is identified as the closest matching student.
Because every dlib descriptor costs ~90 ms here, the baseline runs on a seeded subset of the
probes and strangers (``BASELINE_*`` below); the JSON says so. Work is spread over the CPU cores.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

_LOGGER = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SEED = 20261122
ROSTER_PEOPLE = 50
STRANGER_PEOPLE = 300
ENROLL_PHOTOS = 2
DETECTOR_MODEL = "full_range"
DETECTOR_THRESHOLD = 0.5
MIN_FACE_PX = 20
BASELINE_PROBES_PER_PERSON = 4  # baseline subset: at most this many probes per student
BASELINE_STRANGER_PHOTOS = 1  # ... and this many photos per stranger
CURVE_THRESHOLDS = (0.44, 0.46, 0.47, 0.48, 0.49, 0.50, 0.52, 0.54)


@dataclass(frozen=True)
class LfwSplit:
    """Fixed-seed split of ``lfw_dev``: who is enrolled, who is a stranger, who is for tuning."""

    enroll: dict[str, list[Path]]  # roster person -> the photos enrolled
    probes: dict[str, list[Path]]  # roster person -> their other photos
    strangers: dict[str, list[Path]]  # not enrolled: every photo is a stranger probe
    tuning: dict[str, list[Path]]  # the only people thresholds/calibration may be tuned on


def faces_dir() -> Path:
    return Path(os.environ.get("FACES_DIR", REPO.parent / "shared" / "faces"))


def lfw_split(root: Path, seed: int = SEED) -> LfwSplit:
    people = {p.name: sorted(p.glob("*.jpg")) for p in sorted(root.iterdir()) if p.is_dir()}
    names = sorted(n for n, photos in people.items() if len(photos) >= 2)
    rng = np.random.default_rng(seed)
    eligible = [n for n in names if len(people[n]) >= ENROLL_PHOTOS + 1]
    roster = sorted(rng.choice(eligible, ROSTER_PEOPLE, replace=False).tolist())
    taken = set(roster)
    rest = [n for n in names if n not in taken]
    strangers = sorted(rng.choice(rest, STRANGER_PEOPLE, replace=False).tolist())
    taken |= set(strangers)
    enroll: dict[str, list[Path]] = {}
    probes: dict[str, list[Path]] = {}
    for name in roster:
        photos = people[name]
        chosen = set(rng.choice(len(photos), ENROLL_PHOTOS, replace=False).tolist())
        enroll[name] = [p for i, p in enumerate(photos) if i in chosen]
        probes[name] = [p for i, p in enumerate(photos) if i not in chosen]
    return LfwSplit(
        enroll=enroll,
        probes=probes,
        strangers={n: people[n] for n in strangers},
        tuning={n: people[n] for n in names if n not in taken},
    )


# ------------------------------------------------------------------ workers (one per core)

_STATE: dict[str, Any] = {}


def _init_ours(model_dir: str, model: str, threshold: float, embedder: str) -> None:
    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedding import create_embedder

    logging.disable(logging.INFO)
    _STATE["detector"] = FaceDetector(
        Path(model_dir), model=model, score_threshold=threshold, min_face_px=MIN_FACE_PX,
        threads=1,
    )
    _STATE["embedder"] = create_embedder(embedder, Path(model_dir), detector_model=model)


def _central(detections: Sequence[Any], width: int, height: int) -> Any:
    return min(
        detections,
        key=lambda d: (d.center[0] - width / 2) ** 2 + (d.center[1] - height / 2) ** 2,
    )


def _embed_ours(job: tuple[str, int, bool]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(descriptor, flip-averaged descriptor or None) of the central face, None if no face."""
    from appliance.vision.enroll import detect_still, load_image

    path, jitters, flip = job
    image = load_image(Path(path))
    detections = detect_still(image, _STATE["detector"])
    if not detections:
        return None
    det = _central(detections, image.shape[1], image.shape[0])
    embedder = _STATE["embedder"]
    (plain,) = embedder.embed(image, [det], num_jitters=jitters)
    if not flip:
        return plain, None
    mirrored = np.ascontiguousarray(image[:, ::-1])
    x1, y1, x2, y2 = det.box
    w = image.shape[1]
    kp = det.keypoints.copy()
    kp[:, 0] = w - kp[:, 0]
    mdet = type(det)((w - x2, y1, w - x1, y2), det.score, kp)
    (other,) = embedder.embed(mirrored, [mdet], num_jitters=jitters)
    return plain, (plain + other) / 2.0


def _init_baseline() -> None:
    import face_recognition

    _STATE["fr"] = face_recognition


def _embed_baseline(path: str) -> np.ndarray | None:
    fr = _STATE["fr"]
    image = fr.load_image_file(path)
    locations = fr.face_locations(image)
    if not locations:
        return None
    h, w = image.shape[:2]
    loc = min(
        locations,
        key=lambda t: ((t[1] + t[3]) / 2 - w / 2) ** 2 + ((t[0] + t[2]) / 2 - h / 2) ** 2,
    )
    return np.asarray(fr.face_encodings(image, [loc])[0], np.float32)


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def embed_ours(
    paths: Sequence[Path],
    jitters: int,
    *,
    flip: bool = False,
    model: str = DETECTOR_MODEL,
    threshold: float = DETECTOR_THRESHOLD,
    model_dir: Path | None = None,
    embedder: str = "dlib",
) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
    from models import DEFAULT_MODEL_DIR

    directory = str(model_dir or os.environ.get("APPLIANCE_PATHS__MODEL_DIR", DEFAULT_MODEL_DIR))
    with ProcessPoolExecutor(
        _workers(), initializer=_init_ours, initargs=(directory, model, threshold, embedder)
    ) as pool:
        jobs = [(str(p), jitters, flip) for p in paths]
        return list(pool.map(_embed_ours, jobs, chunksize=8))


def embed_baseline(paths: Sequence[Path]) -> list[np.ndarray | None]:
    with ProcessPoolExecutor(_workers(), initializer=_init_baseline) as pool:
        return list(pool.map(_embed_baseline, [str(p) for p in paths], chunksize=8))


# ------------------------------------------------------------------ scoring


def _stack(items: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
    ok = np.array([e is not None for e in items], bool)
    arr = np.array([e for e in items if e is not None], np.float32).reshape(-1, 128)
    return arr, ok


def score_ours(
    roster_emb: dict[str, list[np.ndarray]],
    probes: list[tuple[str, np.ndarray | None]],
    strangers: list[np.ndarray | None],
    threshold: float,
    margin: float,
    metric: str = "euclidean",
) -> dict[str, Any]:
    from appliance.recognition import Matcher, Roster

    names = sorted(n for n, embs in roster_emb.items() if embs)
    roster = Roster(
        names,
        names,
        np.array([e for n in names for e in roster_emb[n]], np.float32),
        np.array([i for i, n in enumerate(names) for _ in roster_emb[n]], np.int64),
    )
    matcher = Matcher(roster, threshold, margin, metric=metric)
    correct = wrong = unknown = 0
    missed = sum(1 for _, e in probes if e is None)
    found = [(n, e) for n, e in probes if e is not None]
    if found:
        for (truth, _), m in zip(found, matcher.match(np.array([e for _, e in found])),
                                 strict=True):
            if m.student_id is None:
                unknown += 1
            elif m.student_id == truth:
                correct += 1
            else:
                wrong += 1
    unknown += missed
    s_emb, s_ok = _stack(strangers)
    accepted = sum(m.student_id is not None for m in matcher.match(s_emb)) if len(s_emb) else 0
    n_p, n_s = len(probes), len(strangers)
    return {
        "probes": n_p,
        "identified_correctly": round(correct / n_p, 4),
        "identified_as_wrong_student": round(wrong / n_p, 4),
        "unknown": round(unknown / n_p, 4),
        "probe_detection_failures": missed,
        "strangers": n_s,
        "stranger_false_accept_rate": round(accepted / n_s, 4),
        "strangers_accepted": int(accepted),
        "stranger_detection_failures": int((~s_ok).sum()),
    }


def score_baseline(
    roster_emb: dict[str, list[np.ndarray]],
    probes: list[tuple[str, np.ndarray | None]],
    strangers: list[np.ndarray | None],
    tolerance: float,
) -> dict[str, Any]:
    """compare_faces at ``tolerance``; identified = the closest matching student's photo."""
    import face_recognition

    known = [(n, e) for n, embs in roster_emb.items() for e in embs]
    known_names = [n for n, _ in known]
    known_enc = [e for _, e in known]

    def identify(emb: np.ndarray | None) -> str | None:
        if emb is None:
            return None
        hits = face_recognition.compare_faces(known_enc, emb, tolerance=tolerance)
        if not any(hits):
            return None
        dist = face_recognition.face_distance(known_enc, emb)
        dist = np.where(hits, dist, np.inf)
        return known_names[int(np.argmin(dist))]

    results = [(truth, identify(e)) for truth, e in probes]
    n_p = len(probes)
    correct = sum(1 for t, r in results if r == t)
    wrong = sum(1 for t, r in results if r is not None and r != t)
    accepted = sum(1 for e in strangers if identify(e) is not None)
    return {
        "tolerance": tolerance,
        "probes": n_p,
        "identified_correctly": round(correct / n_p, 4),
        "identified_as_wrong_student": round(wrong / n_p, 4),
        "unknown": round((n_p - correct - wrong) / n_p, 4),
        "probe_detection_failures": sum(1 for _, e in probes if e is None),
        "strangers": len(strangers),
        "stranger_false_accept_rate": round(accepted / max(1, len(strangers)), 4),
        "strangers_accepted": accepted,
        "stranger_detection_failures": sum(1 for e in strangers if e is None),
    }


def _roster(
    enroll: dict[str, list[Path]], embeddings: Sequence[np.ndarray | None]
) -> dict[str, list[np.ndarray]]:
    roster: dict[str, list[np.ndarray]] = {n: [] for n in enroll}
    owners = [n for n in sorted(enroll) for _ in enroll[n]]
    for n, e in zip(owners, embeddings, strict=True):
        if e is not None:
            roster[n].append(e)
    return roster


def _flat(groups: dict[str, list[Path]]) -> list[tuple[str, Path]]:
    return [(n, p) for n in sorted(groups) for p in groups[n]]


def _top2(per_student: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index of the closest student, its distance, gap to the second) per row."""
    n = len(per_student)
    if per_student.shape[1] == 1:
        return np.zeros(n, np.int64), per_student[:, 0], np.full(n, np.inf)
    two = np.argsort(per_student, axis=1)[:, :2]
    rows = np.arange(n)
    best = per_student[rows, two[:, 0]]
    return two[:, 0], best, per_student[rows, two[:, 1]] - best


@dataclass
class OpenSet:
    """Distances of one roster's probes and strangers: any (threshold, margin) scores at once."""

    truth: np.ndarray  # probe -> roster index (-1: the probe's face was not found)
    probe: tuple[np.ndarray, np.ndarray, np.ndarray]
    stranger: tuple[np.ndarray, np.ndarray, np.ndarray]
    probes: int
    strangers: int

    @classmethod
    def build(cls, roster_emb: dict[str, list[np.ndarray]],
              probes: Sequence[tuple[str, np.ndarray | None]],
              strangers: Sequence[np.ndarray | None], metric: str) -> OpenSet:
        from appliance.recognition import Matcher, Roster

        names = sorted(n for n, embs in roster_emb.items() if embs)
        roster = Roster(
            names, names,
            np.array([e for n in names for e in roster_emb[n]], np.float32),
            np.array([i for i, n in enumerate(names) for _ in roster_emb[n]], np.int64),
        )
        matcher = Matcher(roster, 1.0, 0.0, metric=metric)
        index = {n: i for i, n in enumerate(names)}
        found = [(n, e) for n, e in probes if e is not None]
        p = np.array([e for _, e in found], np.float32).reshape(-1, 128)
        s_emb, _ = _stack(strangers)
        return cls(
            truth=np.array([index.get(n, -2) for n, _ in found], np.int64),
            probe=_top2(matcher.student_distances(p)),
            stranger=_top2(matcher.student_distances(s_emb)),
            probes=len(probes), strangers=len(strangers),
        )

    def score(self, threshold: float, margin: float) -> dict[str, Any]:
        idx, best, gap = self.probe
        ok = (best <= threshold) & (gap >= margin)
        correct = int((ok & (idx == self.truth)).sum())
        wrong = int((ok & (idx != self.truth)).sum())
        _, s_best, s_gap = self.stranger
        accepted = int(((s_best <= threshold) & (s_gap >= margin)).sum())
        return {
            "threshold": round(float(threshold), 3), "margin": round(float(margin), 3),
            "probes": self.probes,
            "identified_correctly": round(correct / max(1, self.probes), 4),
            "identified_as_wrong_student": round(wrong / max(1, self.probes), 4),
            "wrong_student_probes": wrong,
            "strangers": self.strangers,
            "stranger_false_accept_rate": round(accepted / max(1, self.strangers), 4),
            "strangers_accepted": accepted,
        }


GRIDS = {"dlib": np.round(np.arange(0.30, 0.60, 0.01), 3),
         "sface": np.round(np.arange(0.40, 0.86, 0.01), 3)}
MARGINS = (0.0, 0.02, 0.04, 0.06, 0.08)
FAR_TARGETS = {"far_le_1pct": 0.01, "far_le_0.1pct": 0.001}
TUNE_SPLITS = 10


def calibrate(people: dict[str, list[Path]], enrolled: dict[Path, np.ndarray | None],
              plain: dict[Path, np.ndarray | None], metric: str, grid: np.ndarray,
              splits: int = TUNE_SPLITS) -> dict[str, Any]:
    """Threshold x margin on the TUNING people only: ``splits`` seeded rounds, each a roster of
    2/3 of the people with >= 3 photos (2 enrolled, the rest probes) and every other person a
    stranger; per false-accept target the (threshold, margin) with the best mean
    identification whose mean false-accept rate stays within the target."""
    ident = np.zeros((len(grid), len(MARGINS)))
    far = np.zeros_like(ident)
    wrong = np.zeros_like(ident)
    for r in range(splits):
        rng = np.random.default_rng(1000 + r)
        eligible = [n for n in sorted(people) if len(people[n]) >= ENROLL_PHOTOS + 1]
        roster_names = sorted(rng.choice(eligible, len(eligible) * 2 // 3, replace=False))
        roster_emb: dict[str, list[np.ndarray]] = {}
        probes: list[tuple[str, np.ndarray | None]] = []
        for n in roster_names:
            photos = people[n]
            chosen = set(rng.choice(len(photos), ENROLL_PHOTOS, replace=False).tolist())
            roster_emb[n] = [e for i, p in enumerate(photos) if i in chosen
                             if (e := enrolled[p]) is not None]
            probes += [(n, plain[p]) for i, p in enumerate(photos) if i not in chosen]
        strangers = [plain[p] for n in sorted(people) if n not in roster_names
                     for p in people[n]]
        open_set = OpenSet.build(roster_emb, probes, strangers, metric)
        for i, t in enumerate(grid):
            for j, m in enumerate(MARGINS):
                sc = open_set.score(float(t), m)
                ident[i, j] += sc["identified_correctly"] / splits
                far[i, j] += sc["stranger_false_accept_rate"] / splits
                wrong[i, j] += sc["identified_as_wrong_student"] / splits
    out: dict[str, Any] = {"splits": splits, "people": len(people),
                           "photos": sum(len(v) for v in people.values())}
    for key, target in FAR_TARGETS.items():
        best = None
        for i, t in enumerate(grid):
            for j, m in enumerate(MARGINS):
                if far[i, j] <= target and (best is None or ident[i, j] > best[0] + 1e-9):
                    best = (ident[i, j], float(t), m, far[i, j], wrong[i, j])
        out[key] = None if best is None else {
            "threshold": best[1], "margin": best[2], "tuning_identified": round(best[0], 4),
            "tuning_false_accept": round(best[3], 4), "tuning_wrong_student": round(best[4], 4)}
    return out


def _embed_map(paths: Sequence[Path], jitters: int, embedder: str) -> dict[Path, np.ndarray | None]:
    return {p: (e[0] if e else None)
            for p, e in zip(paths, embed_ours(paths, jitters, embedder=embedder), strict=True)}


def ms_per_face(embedder: str, samples: int = 30) -> float:
    """Single-thread descriptor time on lfw_dev faces (detection excluded)."""
    import cv2 as _cv2

    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedding import create_embedder
    from appliance.vision.enroll import load_image
    from models import DEFAULT_MODEL_DIR

    directory = Path(os.environ.get("APPLIANCE_PATHS__MODEL_DIR", DEFAULT_MODEL_DIR))
    _cv2.setNumThreads(1)
    detector = FaceDetector(directory, score_threshold=DETECTOR_THRESHOLD, min_face_px=MIN_FACE_PX,
                            threads=1)
    emb = create_embedder(embedder, directory, threads=1)
    photos = sorted((faces_dir() / "lfw_dev").glob("*/*.jpg"))[:samples]
    items = []
    for p in photos:
        image = load_image(p)
        dets = detector.detect(image)
        if dets:
            items.append((image, [_central(dets, image.shape[1], image.shape[0])]))
    emb.embed(*items[0])  # warm-up
    t0 = time.perf_counter()
    for image, dets in items:
        emb.embed(image, dets)
    return round((time.perf_counter() - t0) * 1e3 / len(items), 2)


def run_embedder(name: str, split: LfwSplit) -> dict[str, Any]:
    """Every figure of one embedder on lfw_dev: at its configured defaults and at the
    thresholds calibrated (in this run) on the tuning people for <= 1 % / <= 0.1 % strangers."""
    from appliance.config import RecognitionConfig
    from appliance.vision.embedding import spec
    from appliance.vision.enroll import ENROLL_JITTERS

    sp = spec(name)
    cfg = RecognitionConfig(embedder=name)
    started = time.perf_counter()
    enroll_paths = [p for _, p in _flat(split.enroll)]
    enrolled = _embed_map(enroll_paths, ENROLL_JITTERS, name)
    probe_items, stranger_items = _flat(split.probes), _flat(split.strangers)
    plain = _embed_map([p for _, p in probe_items + stranger_items], 1, name)
    bench_s = time.perf_counter() - started
    roster = {n: [e for p in ps if (e := enrolled[p]) is not None]
              for n, ps in split.enroll.items()}
    open_set = OpenSet.build(roster, [(n, plain[p]) for n, p in probe_items],
                             [plain[p] for _, p in stranger_items], sp.metric)
    # calibration on the tuning people only (dlib: tuning rosters from plain descriptors, the
    # 5-jitter enrolment of ~700 tuning photos would cost minutes)
    t_paths = [p for n in sorted(split.tuning) for p in split.tuning[n]]
    t_plain = _embed_map(t_paths, 1, name)
    t_enrolled = _embed_map(t_paths, ENROLL_JITTERS, name) if name == "sface" else t_plain
    calibration = calibrate(split.tuning, t_enrolled, t_plain, sp.metric, GRIDS[name])
    result: dict[str, Any] = {
        "model": sp.id, "metric": sp.metric, "ms_per_face_1_thread": ms_per_face(name),
        "embed_seconds": round(bench_s, 1),
        "at_defaults": open_set.score(cfg.match_threshold(), cfg.match_margin()),
        "calibration_on_tuning_people": calibration,
    }
    for key in FAR_TARGETS:
        point = calibration[key]
        result[f"at_{key}_calibrated"] = (
            None if point is None else open_set.score(point["threshold"], point["margin"]))
    # the whole curve on the benchmark people, for the record only (never used to choose)
    result["curve_benchmark_people"] = [
        open_set.score(float(t), sp.margin) for t in GRIDS[name][::3]]
    result["other_sets"] = other_sets(name, calibration, cfg)
    return result


def run() -> dict[str, Any]:
    from appliance.vision.embedding import EMBEDDER_NAMES
    from appliance.vision.enroll import ENROLL_JITTERS

    root = faces_dir() / "lfw_dev"
    if not root.is_dir():
        return {"skipped": f"{root} not found (set FACES_DIR)"}
    split = lfw_split(root)
    per_embedder = {name: run_embedder(name, split) for name in EMBEDDER_NAMES}
    per_embedder["hamilton_per_frame"] = hamilton_per_frame()

    # baseline on a seeded subset (a dlib descriptor costs ~90 ms on this machine)
    enroll_items = _flat(split.enroll)
    rng = np.random.default_rng(SEED + 1)
    sub_probes = {
        n: sorted(rng.choice(ps, min(len(ps), BASELINE_PROBES_PER_PERSON), replace=False).tolist())
        for n, ps in split.probes.items()
    }
    sub_strangers = {
        n: sorted(rng.choice(ps, BASELINE_STRANGER_PHOTOS, replace=False).tolist())
        for n, ps in split.strangers.items()
    }
    b_probe_items = _flat(sub_probes)
    b_stranger_items = _flat(sub_strangers)
    started = time.perf_counter()
    b_all = embed_baseline([p for _, p in enroll_items + b_probe_items + b_stranger_items])
    base_s = time.perf_counter() - started
    n_e, n_bp = len(enroll_items), len(b_probe_items)
    b_roster = _roster(split.enroll, b_all[:n_e])
    b_probes = [(n, e) for (n, _), e in zip(b_probe_items, b_all[n_e : n_e + n_bp], strict=True)]
    b_strangers = b_all[n_e + n_bp :]
    baseline = {
        "pipeline": "face_recognition HOG face_locations + face_encodings + compare_faces",
        "subset": f"all {n_e} roster photos, <= {BASELINE_PROBES_PER_PERSON} probes per student "
        f"({n_bp}), {BASELINE_STRANGER_PHOTOS} photo per stranger ({len(b_strangers)}), seeded",
        "seconds": round(base_s, 1),
        "tolerance_0.6": score_baseline(b_roster, b_probes, b_strangers, 0.6),
        "tolerance_0.5": score_baseline(b_roster, b_probes, b_strangers, 0.5),
    }
    default = per_embedder["sface"]
    at1, at01 = default["at_far_le_1pct_calibrated"], default["at_far_le_0.1pct_calibrated"]
    targets_met = bool(
        at1 and at01 and at1["identified_correctly"] >= 0.99
        and at1["stranger_false_accept_rate"] <= 0.01
        and at01["identified_correctly"] >= 0.97 and at01["stranger_false_accept_rate"] <= 0.001
        and at1["wrong_student_probes"] == 0 and at01["wrong_student_probes"] == 0)
    return {
        "split": {
            "seed": SEED,
            "roster_people": len(split.enroll),
            "enrolled_photos": len(enroll_items),
            "enroll_jitters": ENROLL_JITTERS,
            "probe_photos": len(_flat(split.probes)),
            "stranger_people": len(split.strangers),
            "stranger_photos": len(_flat(split.strangers)),
            "tuning_people": len(split.tuning),
        },
        "embedders": per_embedder,
        "baseline": baseline,
        "targets": {"default_embedder": "sface", "identified_at_far_le_1pct_min": 0.99,
                    "identified_at_far_le_0.1pct_min": 0.97, "wrong_student_probes": 0},
        "targets_met": targets_met,
    }


# ------------------------------------------------------------------ non-LFW sets


def _orl(root: Path) -> dict[str, list[Path]]:
    base = root / "orl" / "att_faces"
    return {d.name: sorted(d.glob("*.pgm")) for d in sorted(base.iterdir()) if d.is_dir()}


def _deepface(root: Path) -> dict[str, list[Path]]:
    ds = root / "deepface" / "tests" / "unit" / "dataset"
    out: dict[str, list[Path]] = {}
    for line in (root / "deepface" / "identities.csv").read_text().splitlines()[1:]:
        name, files, *_ = line.split(",")
        out[name] = [ds / f for f in files.split() if "/" not in f]
    return out


def _bbt(root: Path) -> dict[str, list[Path]]:
    images = root / "faceapi_bbt" / "examples" / "images"
    return {d.name: sorted(d.glob("*.png")) for d in sorted(images.iterdir()) if d.is_dir()}


def _walking_faces(embedder: str, every: int = 5) -> list[np.ndarray | None]:
    """Descriptors of every face >= 40 px in every ``every``-th frame of the strangers clip."""
    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedding import create_embedder
    from models import DEFAULT_MODEL_DIR

    clip = faces_dir() / "walking" / "strangers_walking_1080p.mp4"
    if not clip.is_file():
        return []
    directory = Path(os.environ.get("APPLIANCE_PATHS__MODEL_DIR", DEFAULT_MODEL_DIR))
    detector = FaceDetector(directory, min_face_px=40)
    emb = create_embedder(embedder, directory)
    cap = cv2.VideoCapture(str(clip))
    out: list[np.ndarray | None] = []
    index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if index % every == 0:
            dets = detector.detect(frame)
            if dets:
                out.extend(emb.embed(frame, dets))
        index += 1
    cap.release()
    return out


def other_sets(name: str, calibration: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """The same open-set protocol on sets less likely to be in SFace's training data: per set,
    a seeded half of the people is the roster (2 photos enrolled, the rest probes), the other
    half are strangers; the walking clip's faces are strangers to the deepface roster.
    Scored at the thresholds calibrated on the LFW tuning people (nothing tuned here)."""
    from appliance.vision.embedding import spec
    from appliance.vision.enroll import ENROLL_JITTERS

    metric = spec(name).metric
    root = faces_dir()
    sets = {"orl": _orl, "deepface": _deepface, "faceapi_bbt": _bbt}
    walking = _walking_faces(name)
    out: dict[str, Any] = {}
    for set_name, loader in sets.items():
        try:
            people = loader(root)
        except OSError as err:
            out[set_name] = {"skipped": str(err)}
            continue
        rng = np.random.default_rng(SEED + 7)
        eligible = sorted(n for n, ps in people.items() if len(ps) >= ENROLL_PHOTOS + 1)
        roster_names = sorted(rng.choice(eligible, len(eligible) // 2, replace=False).tolist())
        picks = {n: set(rng.choice(len(people[n]), ENROLL_PHOTOS, replace=False).tolist())
                 for n in roster_names}
        to_enrol = [p for n in roster_names for i, p in enumerate(people[n]) if i in picks[n]]
        enrolled = _embed_map(to_enrol, ENROLL_JITTERS, name)
        plain = _embed_map([p for n in sorted(people) for p in people[n]
                            if p not in enrolled], 1, name)
        roster: dict[str, list[np.ndarray]] = {}
        probes: list[tuple[str, np.ndarray | None]] = []
        for n in roster_names:
            photos = people[n]
            roster[n] = [e for i, p in enumerate(photos) if i in picks[n]
                         if (e := enrolled[p]) is not None]
            probes += [(n, plain[p]) for i, p in enumerate(photos) if i not in picks[n]]
        strangers = [plain[p] for n in sorted(people) if n not in roster_names
                     for p in people[n]]
        if set_name == "deepface":
            strangers += walking
        open_set = OpenSet.build(roster, probes, strangers, metric)
        entry: dict[str, Any] = {
            "roster_people": len(roster), "stranger_photos_or_faces": len(strangers),
            "at_defaults": open_set.score(cfg.match_threshold(), cfg.match_margin())}
        for key in FAR_TARGETS:
            point = calibration[key]
            entry[f"at_{key}_calibrated"] = (
                None if point is None else open_set.score(point["threshold"], point["margin"]))
        if set_name == "deepface":
            entry["walking_clip_faces_among_strangers"] = len(walking)
        out[set_name] = entry
    return out


# ------------------------------------------------------------------ Hamilton clip, per frame


def hamilton_per_frame(every: int = 2) -> dict[str, Any]:
    """Per embedder, each of Lin-Manuel Miranda and Alex Lacamoire enrolled from its one
    photo: the share of frames of Lin's track (the largest, longest face track of the clip,
    ~95 px) whose single descriptor is accepted as Lin, and how many faces of other tracks are
    accepted as anyone (none should be)."""
    from appliance.config import RecognitionConfig
    from appliance.recognition import Matcher, Roster
    from appliance.tracking import Tracker
    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedding import EMBEDDER_NAMES, create_embedder, spec
    from appliance.vision.enroll import embed_photo, enrollment_detector
    from appliance.vision.enroll import load_image as load
    from models import DEFAULT_MODEL_DIR

    ex = faces_dir() / "face_recognition" / "examples"
    clip = ex / "short_hamilton_clip.mp4"
    if not clip.is_file():
        return {"skipped": f"{clip} not found"}
    directory = Path(os.environ.get("APPLIANCE_PATHS__MODEL_DIR", DEFAULT_MODEL_DIR))
    detector = FaceDetector(directory)
    cap = cv2.VideoCapture(str(clip))
    frames: list[tuple[np.ndarray, list[Any], list[int]]] = []
    tracker = Tracker()
    index = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        dets = detector.detect(frame)
        tracks = tracker.update(dets, index)
        if index % every == 0 and dets:
            ids = {id(t.detection): t.track_id for t in tracks if t.matched}
            frames.append((frame, dets, [ids.get(id(d), -1) for d in dets]))
        index += 1
    cap.release()
    lengths: dict[int, list[float]] = {}
    for _, dets, ids in frames:
        for d, tid in zip(dets, ids, strict=True):
            lengths.setdefault(tid, []).append(d.width)
    lin_track = max(lengths, key=lambda t: len(lengths[t]) * float(np.median(lengths[t])))
    out: dict[str, Any] = {"frames_sampled": len(frames), "every_nth_frame": every,
                           "lin_track_median_px": round(float(np.median(lengths[lin_track])))}
    enroll_detector = enrollment_detector(directory)
    for name in EMBEDDER_NAMES:
        emb = create_embedder(name, directory)
        entries = []
        for sid, photo in (("lin", "lin-manuel-miranda.png"), ("alex", "alex-lacamoire.png")):
            res = embed_photo(load(ex / photo), enroll_detector, emb)
            entries.append((sid, res.embedding))
        roster = Roster([s for s, _ in entries], [s for s, _ in entries],
                        np.array([e for _, e in entries], np.float32), np.arange(len(entries)))
        cfg = RecognitionConfig(embedder=name)
        matcher = Matcher(roster, cfg.match_threshold(), cfg.match_margin(),
                          metric=spec(name).metric)
        lin_total = lin_ok = other_total = 0
        accepted_elsewhere: dict[int, dict[str, int]] = {}
        for frame, dets, ids in frames:
            matches = matcher.match(emb.embed(frame, dets))
            for tid, m in zip(ids, matches, strict=True):
                if tid == lin_track:
                    lin_total += 1
                    lin_ok += m.student_id == "lin"
                else:
                    other_total += 1
                    if m.student_id is not None:
                        per = accepted_elsewhere.setdefault(tid, {})
                        per[m.student_id] = per.get(m.student_id, 0) + 1
        out[name] = {
            "lin_frames": lin_total,
            "lin_frames_accepted": round(lin_ok / max(1, lin_total), 4),
            "other_faces": other_total,
            # faces of other tracks accepted as someone: which track, its size, as whom (Lin
            # and Alex appear in other shots too: look before calling one a false accept)
            "other_faces_accepted": [
                {"track": tid, "faces": len(lengths[tid]),
                 "median_px": round(float(np.median(lengths[tid]))), "accepted_as": per}
                for tid, per in sorted(accepted_elsewhere.items())],
        }
    return out


# ------------------------------------------------------------------ tuning (tuning people only)


def tune(embedder: str = "sface", splits: int = 20) -> dict[str, Any]:
    """Threshold x margin on the TUNING people only (never the benchmark's people);
    ``python -m bench.recognition tune EMBEDDER``."""
    from appliance.vision.embedding import spec
    from appliance.vision.enroll import ENROLL_JITTERS

    split = lfw_split(faces_dir() / "lfw_dev")
    paths = [p for n in sorted(split.tuning) for p in split.tuning[n]]
    plain = _embed_map(paths, 1, embedder)
    enrolled = _embed_map(paths, ENROLL_JITTERS, embedder)
    return {"embedder": embedder, **calibrate(split.tuning, enrolled, plain,
                                              spec(embedder).metric, GRIDS[embedder], splits)}


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] == ["tune"]:
        print(json.dumps(tune(sys.argv[2] if len(sys.argv) > 2 else "sface"), indent=2))
    else:
        print(json.dumps(run(), indent=2))
