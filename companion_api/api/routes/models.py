import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as FastAPIPath
from fastapi.responses import FileResponse
from sqlalchemy import select

from edge_runtime.contract import ArtifactManifest, sha256_file
from edge_runtime.errors import ManifestError
from edge_runtime.formats import RUNTIME_FORMATS

from ...models import ModelArtifact
from ...schemas import ModelPublic
from ..deps import CallerDep, ReviewerDep, SessionDep, audit

router = APIRouter(prefix="/v1/models", tags=["models"])


def _public(row: ModelArtifact, request: Request) -> ModelPublic:
    return ModelPublic(format=row.format, filename=row.filename, sha256=row.sha256, manifest=json.loads(row.manifest),
                       download_url=str(request.url_for("download_model", model_id=row.id)), uploaded_at=row.uploaded_at)


@router.post("", response_model=ModelPublic)
async def upload_model(caller: ReviewerDep, session: SessionDep, request: Request, artifact: UploadFile = File(...),
                       manifest: str = Form(..., max_length=200_000)) -> ModelPublic:
    """Upload a single-file artifact (.onnx, .tflite) with its manifest JSON; checksum verified."""
    try:
        parsed = ArtifactManifest.from_json(manifest)
    except ManifestError as exc:
        raise HTTPException(422, str(exc)) from exc
    spec = RUNTIME_FORMATS.get(parsed.format)
    if spec is None or spec.is_directory:
        raise HTTPException(422, f"format {parsed.format!r} cannot be uploaded as one file")
    store = Path(request.app.state.settings.ARTIFACT_DIR)
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
        target = store / name
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    row = ModelArtifact(format=parsed.format, filename=name, sha256=parsed.sha256, manifest=parsed.to_json(),
                        path=str(target), uploaded_by=caller.name)
    session.add(row)
    audit(session, caller, "upload_model", name, parsed.model_version[:200])
    session.commit()
    return _public(row, request)


@router.get("/latest", response_model=ModelPublic)
def latest_model(caller: CallerDep, session: SessionDep, request: Request,
                 format: str = Query(..., pattern="^[a-z]+$")) -> ModelPublic:
    """The newest artifact of a format: manifest, sha256 and a download URL."""
    row = session.scalar(select(ModelArtifact).where(ModelArtifact.format == format)
                         .order_by(ModelArtifact.uploaded_at.desc(), ModelArtifact.id.desc()))
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
