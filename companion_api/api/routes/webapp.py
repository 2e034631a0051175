"""The offline screening web app (web/, built to web/dist by `make web`), served at /app/.

Every response is cross-origin isolated (COOP same-origin + COEP require-corp), which ONNX Runtime Web needs for
its WASM threads; files are sent pre-compressed (``.gz`` beside them) to browsers that accept gzip. Two live
answers the app needs at setup: ``config.json`` (the publisher keys the server checks uploads against, which the
app pins on its first visit and checks every model manifest against) and ``api/device`` (which device a token belongs to, so its
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
from edge_runtime.signing import load_keyring

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
def app_config(request: Request) -> JSONResponse:
    """The publisher keys the app pins at setup (raw Ed25519 keys in base64 by key id) and the revoked key ids:
    the server's own RETINAEDGE_PUBLISHER_KEYS / REVOKED_PUBLISHER_KEYS, which every upload is checked against."""
    from cryptography.hazmat.primitives import serialization

    settings = request.app.state.settings
    try:
        keys = {kid: key for entry in settings.PUBLISHER_KEYS for kid, key in load_keyring(entry).keys.items()}
    except ManifestSignatureError as exc:
        raise HTTPException(503, f"the server's publisher keys cannot be read ({exc})") from exc
    raw = {kid: base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
           for kid, key in sorted(keys.items()) if kid not in settings.REVOKED_PUBLISHER_KEYS}
    return JSONResponse({"keys": raw, "revoked": sorted(settings.REVOKED_PUBLISHER_KEYS)},
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
