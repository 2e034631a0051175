"""Commands that run on the screening device: grade, watch, sync, update-model, info. They import only
edge_runtime, so they work in an install without torch."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from edge_runtime.presentation import NOT_A_DIAGNOSIS, encounter_json, result_json, verdict_text
from retinaedge.cli._app import app, console, out_console
from retinaedge.cli._common import fail, setup_logging


@app.command()
def grade(
    images: list[Path] | None = typer.Argument(None, help="Fundus photos, or one folder per encounter (visit): its "
                                               "photos' names say the eye (left/right/OS/OD)."),
    encounter: str | None = typer.Option(None, help="Visit id the photos belong to (an opaque id, never a name); "
                                         "prints the visit's referral decision over both eyes."),
    video: list[Path] | None = typer.Option(None, "--video", help="Capture video(s): the sharpest gradable frame of "
                                            "each is graded and stored as one result (repeat for several)."),
    eye: str | None = typer.Option(None, help="left | right: the eye the photos or --video show (default: from "
                                   "each file name)."),
    stride: int = typer.Option(1, help="--video: score every n-th frame."),
    store_overlays: bool = typer.Option(False, "--store-overlays", help="Render each CAM overlay inside the step and "
                                        "store it with the result (for the server's review page); off: on demand."),
    artifact: Path = typer.Option(..., help="An exported artifact (.onnx, .tflite, .mlpackage) with its manifest."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object per image."),
    save_overlay: Path | None = typer.Option(None, help="Folder for CAM overlay PNGs."),
    outbox: Path | None = typer.Option(None, help="Outbox database; results are stored before they are printed."),
    device_id: str = typer.Option("local"), threads: int | None = typer.Option(None),
    allow_ungated: bool = typer.Option(False, "--allow-ungated", help="Use an artifact that failed its fidelity gate."),
    site_point: Path | None = typer.Option(None, help="A signed site operating point (`validate-site "
                                           "--choose-point`) to refer at instead of the manifest's."),
    site_key: str | None = typer.Option(None, help="The site's Ed25519 public key (PEM file or text) that must have "
                                        "signed --site-point."),
):
    """Grade fundus photos on this device (no torch needed)."""
    from edge_runtime.capture import plan_captures
    from edge_runtime.errors import ImageError, RetinaEdgeError
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener
    from edge_runtime.video import screen_video

    try:
        screener = Screener.from_artifact(artifact, allow_ungated=allow_ungated, threads=threads, device_id=device_id,
                                          outbox=Outbox(outbox) if outbox else None, store_overlays=store_overlays)
        if eye not in (None, "left", "right"):
            raise ValueError(f"--eye must be left or right, got {eye!r}")
        if not images and not video:
            raise ValueError("give fundus photos and/or --video clips")
        captures = plan_captures(images or [], encounter, eye)
        if site_point is not None:
            from edge_runtime.site import load_site_point

            screener.operating_point, site = load_site_point(site_point, screener.session.info.manifest, site_key)
            console.print(f"referring at site {site}'s operating point: {screener.operating_point.describe()}")
    except (RetinaEdgeError, ImportError, ValueError) as exc:
        fail(exc)
    failures, visits = 0, {}
    for clip in video or []:
        try:
            screening, choice = screen_video(screener, clip, eye=eye, stride=stride, encounter_id=encounter)
        except ImageError as exc:
            failures += 1
            _report_capture_error("video", clip, exc, json_output)
            continue
        result = screening.result
        if json_output:
            print(json.dumps(result_json(result, overlay=None, frame=choice.index, frames_scored=len(choice.scored),
                                         gradable_frames=sum(q.report.gradable for q in choice.scored))))
        else:
            out_console.print(f"{result.image_name}: frame {choice.index} of {len(choice.scored)} scored, quality "
                              f"{result.quality.score:.2f}: {verdict_text(result)}  [{result.backend}/{result.provider}]")
        visits.setdefault(encounter, []).append(result)
    for image, visit in captures:
        try:
            screening = screener.screen_file(image, visit=visit)
        except ImageError as exc:
            failures += 1
            _report_capture_error("image", image, exc, json_output)
            continue
        result = screening.result
        overlay_path = None
        if save_overlay and screening.overlay_png:
            save_overlay.mkdir(parents=True, exist_ok=True)
            overlay_path = save_overlay / f"{image.stem}_cam.png"
            overlay_path.write_bytes(screening.overlay_png)
        if json_output:
            print(json.dumps(result_json(result, overlay=str(overlay_path) if overlay_path else None)))
        else:
            out_console.print(f"{image.name}: {verdict_text(result)}  [{result.backend}/{result.provider}, "
                              f"{result.model_version}]")
        visits.setdefault(visit.encounter_id, []).append(result)
    _print_encounters(visits, json_output)
    if not json_output:
        console.print(NOT_A_DIAGNOSIS)
    raise typer.Exit(1 if failures else 0)


def _report_capture_error(kind: str, path: Path, exc: Exception, json_output: bool) -> None:
    if json_output:
        print(json.dumps({kind: str(path), "error": type(exc).__name__, "detail": str(exc)}))
    else:
        console.print(f"[red]{path.name}: {exc}[/red]")


def _print_encounters(visits: dict, json_output: bool) -> None:
    """Each visit's referral decision over both eyes (edge_runtime.wire.encounter_decision)."""
    from edge_runtime.wire import encounter_decision

    for encounter_id, results in visits.items():
        if encounter_id is None:
            continue
        decision = encounter_decision(results)
        if json_output:
            print(json.dumps(encounter_json(encounter_id, decision)))
        else:
            out_console.print(f"visit {encounter_id}: [bold]{decision.decision.upper()}[/bold] - {decision.reason}")


@app.command()
def watch(
    folder: Path = typer.Argument(..., help="Capture folder to watch."),
    artifact: Path = typer.Option(...), outbox: Path = typer.Option(Path("retinaedge_outbox.db")),
    device_id: str = typer.Option("local"), interval: float = typer.Option(2.0),
    once: bool = typer.Option(False, "--once", help="Grade what is there now, then exit."),
    allow_ungated: bool = typer.Option(False, "--allow-ungated"),
    burst: bool = typer.Option(False, "--burst", help="Each sub-folder is a burst of frames of one capture: grade "
                               "only the sharpest gradable frame per eye (eye from the file names: left/right/OS/OD)."),
    store_overlays: bool = typer.Option(False, "--store-overlays", help="Store each CAM overlay with its result."),
):
    """Grade each new image in a capture folder exactly once, surviving restarts."""
    setup_logging(False)
    from edge_runtime.outbox import Outbox
    from edge_runtime.screen import Screener
    from edge_runtime.watch import watch_bursts, watch_folder

    box = Outbox(outbox)
    screener = Screener.from_artifact(artifact, allow_ungated=allow_ungated, device_id=device_id, outbox=box,
                                      store_overlays=store_overlays)
    graded = (watch_bursts if burst else watch_folder)(folder, screener, box, interval=interval, once=once)
    console.print(f"graded {graded} new image(s); outbox {box.counts()}")


@app.command()
def sync(
    server: str = typer.Option(..., help="Companion server URL."), token: str = typer.Option(..., envvar="RETINAEDGE_TOKEN"),
    outbox: Path = typer.Option(Path("retinaedge_outbox.db"), help="An existing outbox (sync never creates one)."),
    loop: bool = typer.Option(False, "--loop"), batch_size: int = typer.Option(25), max_rounds: int | None = typer.Option(None),
):
    """Send unacknowledged results to the companion server (idempotent; resumes after restarts)."""
    setup_logging(False)
    from edge_runtime.errors import OutboxError
    from edge_runtime.outbox import Outbox
    from edge_runtime.sync import SyncClient, SyncError

    try:
        box = Outbox(outbox, create=False)
        report = SyncClient(server, token, box, batch_size).run(loop=loop, max_rounds=max_rounds)
        counts = box.counts()
        quarantined = box.quarantined() if report.quarantined else []
    except (SyncError, OutboxError) as exc:
        fail(exc)
    console.print(f"sent {report.sent}, outbox {counts}, errors {report.errors}, quarantined {report.quarantined}")
    for row in quarantined[:10]:
        console.print(f"[yellow]quarantined (kept in {outbox}, never sent): {row.result_id}: {row.reason}[/yellow]")


@app.command("update-model")
def update_model(
    server: str = typer.Option(...), token: str = typer.Option(..., envvar="RETINAEDGE_TOKEN"),
    format: str = typer.Option("onnx"), dest: Path = typer.Option(Path("models")),
    trusted_key: str | None = typer.Option(None, "--trusted-key", envvar="RETINAEDGE_TRUSTED_KEY",
                                           help="Publisher's Ed25519 public key (PEM file, PEM text or raw base64); "
                                                "unsigned or altered manifests are then refused."),
    max_mb: float = typer.Option(512.0, help="Largest model this device accepts, MiB."),
    deadline: float = typer.Option(900.0, help="Seconds the whole update may take."),
):
    """Download the newest artifact; it replaces the current one only after every load-time check passed."""
    from edge_runtime.errors import RetinaEdgeError
    from edge_runtime.updates import UpdateLimits, install_latest_model

    try:
        limits = UpdateLimits(max_model_bytes=int(max_mb * 2**20), deadline_s=deadline)
        installed = install_latest_model(server, token, format, dest, limits=limits, trusted_key=trusted_key)
    except (RetinaEdgeError, OSError, ValueError) as exc:
        fail(exc)
    kept = f"; previous kept at {installed.previous}" if installed.previous else ""
    out_console.print(f"verified and installed {installed.manifest.model_version}: screen with {installed.path}{kept}")


@app.command()
def info(artifact: Path = typer.Argument(...), allow_ungated: bool = typer.Option(True)):
    """Show an artifact's manifest, backend and active providers."""
    from edge_runtime.backends import open_session
    from edge_runtime.errors import RetinaEdgeError

    try:
        session = open_session(artifact, allow_ungated=allow_ungated)
        manifest, backend = session.info.manifest.to_dict(), {"backend": session.info.backend, "provider": session.info.provider,
                                                               **session.info.extra}
    except ImportError as exc:  # e.g. CoreML on Linux: still show the manifest
        from edge_runtime.backends import load_manifest

        manifest, backend = load_manifest(artifact).to_dict(), {"unavailable": str(exc)}
    except RetinaEdgeError as exc:
        fail(exc)
    print(json.dumps({"manifest": manifest, "runtime": backend}, indent=2, default=str))


@app.command("validate-site")
def validate_site(
    artifact: Path = typer.Option(..., help="The artifact the clinic screens with (with its manifest)."),
    data: Path = typer.Option(..., help="The clinic's labelled photos: labels.csv (image, grade[, dme, split]; "
                              "blank grades allowed where a DME label is given) or another supported layout."),
    split: str | None = typer.Option(None, help="Only this split of the folder (default: every photo)."),
    max_half_width: float = typer.Option(0.10, help="Evidence: each 95% interval (sensitivity, specificity) no "
                                         "wider than +- this."),
    choose_point: bool = typer.Option(False, "--choose-point", help="Also choose a site operating point for the "
                                      "manifest's rule and target (only with sufficient evidence)."),
    site: str | None = typer.Option(None, help="--choose-point: an opaque site id recorded in the point."),
    signing_key: Path | None = typer.Option(None, help="--choose-point: the site's Ed25519 private key (PEM) that "
                                            "signs the point; devices apply it only with the matching public key."),
    out: Path = typer.Option(Path("site_point.json"), help="--choose-point: where the signed point is written."),
    threads: int | None = typer.Option(None), json_output: bool = typer.Option(False, "--json"),
):
    """An artifact's sensitivity and specificity at its operating point on a clinic's own labelled photos, with
    95% intervals and an evidence verdict; optionally a signed site operating point (no torch needed)."""
    from edge_runtime.errors import RetinaEdgeError
    from edge_runtime.screen import Screener
    from edge_runtime.signing import sign_manifest
    from edge_runtime.site import SiteEvidence, choose_site_point, site_photos, site_point_document
    from edge_runtime.site import validate_site as run_validation
    from training.data.layouts import read_partial_labels
    from training.errors import DatasetError

    try:
        if choose_point and not (site and signing_key):
            raise ValueError("--choose-point needs --site and --signing-key: a site point is always signed")
        screener = Screener.from_artifact(artifact, threads=threads)
        photos = site_photos((p.path, p.grade, p.dme) for p in read_partial_labels(data, split))
        report = run_validation(screener, photos, SiteEvidence(max_half_width=max_half_width))
        document = None
        if choose_point:
            point = choose_site_point(report, screener.operating_point)
            document = sign_manifest(site_point_document(report, point, screener.session.info.manifest, site),
                                     signing_key)
            out.write_text(json.dumps(document, indent=2, sort_keys=True))
    except (RetinaEdgeError, DatasetError, ValueError, OSError) as exc:
        fail(exc)
    if json_output:
        print(json.dumps({**report.to_dict(), "site_point": str(out) if document else None}))
    else:
        for line in report.lines():
            out_console.print(line)
        if document:
            out_console.print(f"site operating point (threshold {document['operating_point']['threshold']:.3f}) "
                              f"signed and written to {out}; apply with `grade --site-point {out} --site-key PUB`")
        console.print(NOT_A_DIAGNOSIS)
    raise typer.Exit(0 if report.evidence.value == "sufficient" else 1)
