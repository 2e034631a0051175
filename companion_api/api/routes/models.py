import json
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as FastAPIPath
from fastapi.responses import FileResponse
from sqlalchemy import func, select

from edge_runtime.contract import ArtifactManifest, sha256_file
from edge_runtime.errors import ManifestError, ManifestSignatureError
from edge_runtime.formats import RUNTIME_FORMATS
from edge_runtime.signing import Keyring, Release, load_keyring, verify_manifest
from edge_runtime.updates import SAFE_VERSION

from ...models import ModelArtifact
from ...schemas import ModelPublic
from ..deps import CallerDep, PublisherDep, SessionDep, audit

router = APIRouter(prefix="/v1/models", tags=["models"])


def _public(row: ModelArtifact, request: Request) -> ModelPublic:
    return ModelPublic(format=row.format, filename=row.filename, sha256=row.sha256, manifest=json.loads(row.manifest),
                       download_url=str(request.url_for("download_model", model_id=row.id)), uploaded_at=row.uploaded_at,
                       size_bytes=row.size_bytes, sequence=row.sequence)


def _release(raw: dict, parsed: ArtifactManifest, settings, session, now: datetime) -> Release | None:
    """The upload's signed release, checked as a device will check it: a trusted, unrevoked publisher key, not
    expired, newer than the published release of the format. None only on a development server (ALLOW_UNSIGNED_MODELS)
    for an upload without a release."""
    signature = raw.get("signature")
    if settings.ALLOW_UNSIGNED_MODELS and not (isinstance(signature, dict) and "release" in signature):
        return None  # development: unsigned, or signed before releases existed (no order to check)
    if not settings.PUBLISHER_KEYS:
        raise HTTPException(503, "this server has no publisher keys (RETINAEDGE_PUBLISHER_KEYS): it cannot check "
                                 "what devices will check, so it publishes nothing")
    try:
        keys = [key for entry in settings.PUBLISHER_KEYS for key in load_keyring(entry).keys.values()]
    except ManifestSignatureError as exc:
        raise HTTPException(503, f"the server's publisher keys cannot be read ({exc})") from exc
    keyring = Keyring.of(*keys, revoked=set(settings.REVOKED_PUBLISHER_KEYS))
    try:
        release = verify_manifest(raw, keyring, what="the uploaded manifest")
    except ManifestSignatureError as exc:
        raise HTTPException(422, str(exc)) from exc
    if release is None:
        raise HTTPException(422, "the manifest is signed without a release (sequence, expiry): sign it with "
                                 "edge_runtime.signing.sign_manifest(..., release=Release(...))")
    if release.expires_at <= now:
        raise HTTPException(422, f"the release expired at {release.expires_at.isoformat()}")
    published = session.scalar(select(func.max(ModelArtifact.sequence)).where(ModelArtifact.format == parsed.format))
    if published is not None and release.sequence <= published:
        raise HTTPException(409, f"release {release.sequence} is not newer than the published {parsed.format} release "
                                 f"{published}; sign the new model with a higher sequence")
    return release


@router.post("", response_model=ModelPublic)
async def upload_model(caller: PublisherDep, session: SessionDep, request: Request, artifact: UploadFile = File(...),
                       manifest: str = Form(..., max_length=200_000)) -> ModelPublic:
    """Publish a single-file artifact (.onnx, .tflite): its manifest signed with a newer release; checksum verified."""
    settings = request.app.state.settings
    try:
        raw = json.loads(manifest)
        parsed = ArtifactManifest.from_dict(raw)
    except (ManifestError, ValueError, RecursionError) as exc:
        raise HTTPException(422, f"invalid manifest: {str(exc)[:300]}") from None
    spec = RUNTIME_FORMATS.get(parsed.format)
    if spec is None or spec.is_directory:
        raise HTTPException(422, f"format {parsed.format!r} cannot be uploaded as one file")
    if not SAFE_VERSION.fullmatch(parsed.model_version):
        raise HTTPException(422, f"model_version {parsed.model_version[:80]!r} is not a plain name (letters, digits, "
                                 ". _ + -): devices would refuse it")
    if not parsed.ready and not settings.ALLOW_UNSIGNED_MODELS:  # devices would refuse it: fleet updates would stall
        raise HTTPException(422, f"the fidelity gate is {str(parsed.gate.status)!r}: devices would refuse it")
    if parsed.sha256 is None:
        raise HTTPException(422, "the manifest has no sha256 of the file")
    release = _release(raw, parsed, settings, session, datetime.now(timezone.utc))
    store = Path(settings.ARTIFACT_DIR)
    store.mkdir(parents=True, exist_ok=True)
    # The stored name is the server's own (format, checksum, random suffix): model_version is free text from the
    # uploader and never touches the file system. Written to a temp file, verified, then renamed atomically, so a
    # failed upload leaves every live artifact (and what /latest advertises) untouched.
    name = f"{parsed.format}-{parsed.sha256[:16]}-{uuid.uuid4().hex[:12]}{spec.suffix}"
    handle, temp = tempfile.mkstemp(dir=store, prefix=".upload-", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as fh:
            shutil.copyfileobj(artifact.file, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if sha256_file(temp) != parsed.sha256:
            raise HTTPException(422, "uploaded file does not match the manifest's sha256")
        size = os.path.getsize(temp)
        target = store / name
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    # The manifest is kept as the publisher signed it: devices verify these very bytes' canonical form.
    row = ModelArtifact(format=parsed.format, filename=name, sha256=parsed.sha256, manifest=json.dumps(raw),
                        path=str(target), uploaded_by=caller.name, size_bytes=size,
                        sequence=release.sequence if release else None)
    session.add(row)
    audit(session, caller, "upload_model", name, f"{parsed.model_version[:160]} release "
                                                 f"{release.sequence if release else 'unsigned'}")
    session.commit()
    return _public(row, request)


@router.get("/latest", response_model=ModelPublic)
def latest_model(caller: CallerDep, session: SessionDep, request: Request,
                 format: str = Query(..., pattern="^[a-z]+$")) -> ModelPublic:
    """The highest signed release of a format: manifest, sha256, size and a download URL."""
    row = session.scalar(select(ModelArtifact).where(ModelArtifact.format == format)
                         .order_by(ModelArtifact.sequence.desc().nulls_last(), ModelArtifact.id.desc()).limit(1))
    if row is None:
        raise HTTPException(404, f"no {format} model uploaded yet")
    return _public(row, request)


@router.get("/{model_id}/download", name="download_model")
def download_model(caller: CallerDep, session: SessionDep,
                   model_id: int = FastAPIPath(..., ge=1, le=2**31 - 1)) -> FileResponse:
    """Download an artifact; the client verifies its sha256 before switching."""
    row = session.get(ModelArtifact, model_id)
    if row is None or not Path(row.path).is_file():
        raise HTTPException(404, "model not found")
    return FileResponse(row.path, filename=row.filename)
