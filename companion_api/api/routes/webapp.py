"""The offline screening web app (web/, built to web/dist by `make web`), served at /app/.

Every response is cross-origin isolated (COOP same-origin + COEP require-corp), which ONNX Runtime Web needs for
its WASM threads; files are sent pre-compressed (``.gz`` beside them) to browsers that accept gzip. Two live
answers the app needs at setup: ``config.json`` (the publisher's Ed25519 public key, which the app pins on its
first visit and checks every model manifest against) and ``api/device`` (which device a token belongs to, so its
results carry the name the sync endpoint expects).
"""
from __future__ import annotations

import base64
import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi import Path as FastAPIPath
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from edge_runtime.errors import ManifestSignatureError
from edge_runtime.signing import key_id, trusted_key_from_env

from ..deps import DeviceDep

router = APIRouter(prefix="/app", tags=["webapp"], include_in_schema=False)
DIST = Path(__file__).resolve().parents[3] / "web" / "dist"
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".css": "text/css",
         ".html": "text/html; charset=utf-8", ".svg": "image/svg+xml", ".webmanifest": "application/manifest+json"}
# The shell and the service worker are revalidated on every online visit (so a new build reaches the phones);
# the runtime files change only with the ONNX Runtime version, and the service worker caches them all anyway.
REVALIDATE = {"index.html", "sw.js", "check.html", "manifest.webmanifest"}


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**ISOLATION, **(extra or {})}


@router.get("", include_in_schema=False)
def app_root() -> RedirectResponse:
    return RedirectResponse("/app/", status_code=308)


@router.get("/config.json")
def app_config() -> JSONResponse:
    """The publisher key the app pins (raw Ed25519 key, base64), from $RETINAEDGE_TRUSTED_KEY as devices read it."""
    try:
        key = trusted_key_from_env()
    except ManifestSignatureError as exc:
        raise HTTPException(500, f"the server's trusted key is unreadable: {exc}") from exc
    if key is None:
        return JSONResponse({"trusted_key": None, "key_id": None}, headers=_headers({"Cache-Control": "no-store"}))
    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return JSONResponse({"trusted_key": base64.b64encode(raw).decode(), "key_id": key_id(key)},
                        headers=_headers({"Cache-Control": "no-store"}))


@router.get("/api/device")
def app_device(caller: DeviceDep) -> JSONResponse:
    """Which device this token belongs to (its results must carry that name)."""
    return JSONResponse({"device_id": caller.name}, headers=_headers({"Cache-Control": "no-store"}))


@router.get("/")
def app_index(request: Request) -> Response:
    """The app shell."""
    return _file(request, "index.html")


@router.get("/{path:path}")
def app_file(request: Request, path: str = FastAPIPath(..., max_length=200)) -> Response:
    """A file of the built app."""
    return _file(request, path)


def _file(request: Request, path: str) -> Response:
    if not DIST.is_dir():
        raise HTTPException(404, "the web app is not built here: run `make web`")
    target = (DIST / path).resolve()
    if not target.is_relative_to(DIST.resolve()) or not target.is_file() or target.suffix == ".gz":
        raise HTTPException(404, "not part of the web app")
    headers = _headers({"Cache-Control": "no-cache" if target.name in REVALIDATE else "public, max-age=86400",
                        "Vary": "Accept-Encoding"})
    media = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    packed = target.with_name(target.name + ".gz")
    if packed.is_file() and "gzip" in request.headers.get("accept-encoding", ""):
        return FileResponse(packed, media_type=media, headers={**headers, "Content-Encoding": "gzip"})
    return FileResponse(target, media_type=media, headers=headers)
