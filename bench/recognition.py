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


def _init_ours(model_dir: str, model: str, threshold: float) -> None:
    from appliance.vision.detector import FaceDetector
    from appliance.vision.embedder import FaceEmbedder

    logging.disable(logging.INFO)
    _STATE["detector"] = FaceDetector(
        Path(model_dir), model=model, score_threshold=threshold, min_face_px=MIN_FACE_PX,
        threads=1,
    )
    _STATE["embedder"] = FaceEmbedder(Path(model_dir), detector_model=model)


def _central(detections: Sequence[Any], width: int, height: int) -> Any:
    return min(
        detections,
        key=lambda d: (d.center[0] - width / 2) ** 2 + (d.center[1] - height / 2) ** 2,
    )


def _embed_ours(job: tuple[str, int, bool]) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(descriptor, flip-averaged descriptor or None) of the central face, None if no face."""
    path, jitters, flip = job
    image = cv2.imread(path)
    detections = _STATE["detector"].detect(image)
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
) -> list[tuple[np.ndarray, np.ndarray | None] | None]:
    from models import DEFAULT_MODEL_DIR

    directory = str(model_dir or os.environ.get("APPLIANCE_PATHS__MODEL_DIR", DEFAULT_MODEL_DIR))
    with ProcessPoolExecutor(
        _workers(), initializer=_init_ours, initargs=(directory, model, threshold)
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
) -> dict[str, Any]:
    from appliance.recognition import Matcher, Roster

    names = sorted(n for n, embs in roster_emb.items() if embs)
    roster = Roster(
        names,
        names,
        np.array([e for n in names for e in roster_emb[n]], np.float32),
        np.array([i for i, n in enumerate(names) for _ in roster_emb[n]], np.int64),
    )
    matcher = Matcher(roster, threshold, margin)
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


def run() -> dict[str, Any]:
    from appliance.config import RecognitionConfig
    from appliance.vision.enroll import ENROLL_JITTERS

    root = faces_dir() / "lfw_dev"
    if not root.is_dir():
        return {"skipped": f"{root} not found (set FACES_DIR)"}
    split = lfw_split(root)
    cfg = RecognitionConfig()
    enroll_items = _flat(split.enroll)
    probe_items = _flat(split.probes)
    stranger_items = _flat(split.strangers)

    started = time.perf_counter()
    enrolled = embed_ours([p for _, p in enroll_items], ENROLL_JITTERS)
    roster = _roster(split.enroll, [e[0] if e else None for e in enrolled])
    rest = embed_ours([p for _, p in probe_items + stranger_items], 1)
    ours_s = time.perf_counter() - started
    n_p = len(probe_items)
    single = [e[0] if e else None for e in rest]
    probes = [(n, e) for (n, _), e in zip(probe_items, single[:n_p], strict=True)]
    common = {
        "detector": f"blazeface {DETECTOR_MODEL} (score >= {DETECTOR_THRESHOLD})",
        "threshold": cfg.threshold,
        "margin": cfg.margin,
        "student_template": "centroid of the enrolled descriptors",
        "enroll_jitters": ENROLL_JITTERS,
    }
    ours = {
        **common,
        **score_ours(roster, probes, single[n_p:], cfg.threshold, cfg.margin),
        "seconds": round(ours_s, 1),
    }

    # baseline on a seeded subset (a dlib descriptor costs ~90 ms on this machine)
    rng = np.random.default_rng(SEED + 1)
    sub_probes = {
        n: sorted(rng.choice(ps, min(len(ps), BASELINE_PROBES_PER_PERSON), replace=False).tolist())
        for n, ps in split.probes.items()
    }
    sub_strangers = {
        n: sorted(rng.choice(ps, BASELINE_STRANGER_PHOTOS, replace=False).tolist())
        for n, ps in split.strangers.items()
    }
    b_enroll_items = enroll_items
    b_probe_items = _flat(sub_probes)
    b_stranger_items = _flat(sub_strangers)
    started = time.perf_counter()
    b_all = embed_baseline([p for _, p in b_enroll_items + b_probe_items + b_stranger_items])
    base_s = time.perf_counter() - started
    n_e, n_bp = len(b_enroll_items), len(b_probe_items)
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
    # ours scored on the very same subset, for a like-for-like comparison
    index = {p: i for i, (_, p) in enumerate(probe_items + stranger_items)}
    ours_subset = score_ours(
        roster,
        [(n, single[index[p]]) for n, p in b_probe_items],
        [single[index[p]] for _, p in b_stranger_items],
        cfg.threshold,
        cfg.margin,
    )
    t06, t05 = baseline["tolerance_0.6"], baseline["tolerance_0.5"]
    # The whole trade-off on the benchmark people, for the record (the defaults were chosen on
    # the tuning people only): what any threshold would give with the same descriptors.
    curve = []
    for threshold in CURVE_THRESHOLDS:
        for margin in (0.0, cfg.margin):
            point = score_ours(roster, probes, single[n_p:], threshold, margin)
            curve.append({
                "threshold": threshold, "margin": margin,
                "identified_correctly": point["identified_correctly"],
                "identified_as_wrong_student": point["identified_as_wrong_student"],
                "stranger_false_accept_rate": point["stranger_false_accept_rate"],
            })

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    return {
        "split": {
            "seed": SEED,
            "roster_people": len(split.enroll),
            "enrolled_photos": len(enroll_items),
            "probe_photos": n_p,
            "stranger_people": len(split.strangers),
            "stranger_photos": len(stranger_items),
            "tuning_people": len(split.tuning),
        },
        "ours": ours,
        "ours_threshold_curve": curve,
        "ours_on_baseline_subset": ours_subset,
        "baseline": baseline,
        "targets": {"identified_correctly_min": 0.97, "stranger_false_accept_max": 0.01},
        "targets_met": ours["identified_correctly"] >= 0.97
        and ours["stranger_false_accept_rate"] <= 0.01,
        "ratios_on_baseline_subset": {
            "identified_vs_baseline_0.5": ratio(
                ours_subset["identified_correctly"], t05["identified_correctly"]
            ),
            "false_accept_vs_baseline_0.6": ratio(
                ours_subset["stranger_false_accept_rate"], t06["stranger_false_accept_rate"]
            ),
        },
    }


# ------------------------------------------------------------------ tuning (tuning people only)


def tune(
    splits: int = 20, jitters: int | None = None, model: str = DETECTOR_MODEL
) -> dict[str, Any]:
    """Sweep threshold x margin on the TUNING people only (never the benchmark's people).

    Each of ``splits`` seeded rounds splits the tuning people into a roster (people with >= 3
    photos, 2 enrolled, the rest probes) and strangers (the others and a share of the roster-
    eligible people); the sweep reports, per (threshold, margin), the mean identification and
    false-accept rates over the rounds. ``python -m bench.recognition tune``.
    """
    from appliance.vision.enroll import ENROLL_JITTERS

    jitters = ENROLL_JITTERS if jitters is None else jitters
    split = lfw_split(faces_dir() / "lfw_dev")
    people = split.tuning
    paths = [p for n in sorted(people) for p in people[n]]
    plain = [e[0] if e else None for e in embed_ours(paths, 1, model=model)]
    jittered = (
        [e[0] if e else None for e in embed_ours(paths, jitters, model=model)]
        if jitters > 1
        else plain
    )
    index = {p: i for i, p in enumerate(paths)}
    grid_t = np.round(np.arange(0.30, 0.56, 0.01), 2)
    grid_m = np.round(np.arange(0.0, 0.13, 0.02), 2)
    ident = np.zeros((len(grid_t), len(grid_m)))
    far = np.zeros_like(ident)
    for r in range(splits):
        rng = np.random.default_rng(1000 + r)
        eligible = [n for n in sorted(people) if len(people[n]) >= 3]
        roster_names = sorted(rng.choice(eligible, len(eligible) * 2 // 3, replace=False))
        roster_emb: dict[str, list[np.ndarray]] = {}
        probes: list[tuple[str, np.ndarray | None]] = []
        for n in roster_names:
            photos = people[n]
            chosen = set(rng.choice(len(photos), ENROLL_PHOTOS, replace=False).tolist())
            roster_emb[n] = [
                e for i, p in enumerate(photos) if i in chosen
                if (e := jittered[index[p]]) is not None
            ]
            probes += [(n, plain[index[p]]) for i, p in enumerate(photos) if i not in chosen]
        strangers = [plain[index[p]] for n in sorted(people) if n not in roster_names
                     for p in people[n]]
        for i, t in enumerate(grid_t):
            for j, m in enumerate(grid_m):
                s = score_ours(roster_emb, probes, strangers, float(t), float(m))
                ident[i, j] += s["identified_correctly"] / splits
                far[i, j] += s["stranger_false_accept_rate"] / splits
    rows = [
        {"threshold": float(t), "margin": float(m), "identified": round(ident[i, j], 4),
         "false_accept": round(far[i, j], 4)}
        for i, t in enumerate(grid_t) for j, m in enumerate(grid_m)
    ]
    ok = [r for r in rows if r["false_accept"] <= 0.01]
    best = max(ok, key=lambda r: (r["identified"], -r["false_accept"])) if ok else None
    return {"model": model, "jitters": jitters, "people": len(people), "photos": len(paths),
            "best_with_far_le_1pct": best, "grid": rows}


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:2] == ["tune"]:
        result = tune(model=sys.argv[2] if len(sys.argv) > 2 else DETECTOR_MODEL)
        grid = result.pop("grid")
        print(json.dumps(result, indent=2))
        for row in grid:
            print(row)
    else:
        print(json.dumps(run(), indent=2))
