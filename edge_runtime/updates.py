"""Model distribution on the device: fetch the latest artifact from the companion server and switch to it only
after it passed every check a screening session makes.

The server is treated as hostile:
- nothing it names becomes a path: the file lands at ``versions/<model_version>-<sha12>/model<suffix>``, built here
  from a validated version string and the sha256; a ``filename`` with a path in it refuses the update;
- the bearer token goes only to the server's own origin (scheme, host, port); a download URL or redirect elsewhere
  refuses the update before any request is sent there;
- sizes and time are bounded: the ``/latest`` JSON, the model (its published ``size_bytes`` and a local cap) and
  the whole update (an overall deadline, so a byte-every-few-seconds drip cannot hold the device forever);
- a signature is required: the published manifest must be signed by a trusted publisher key (a keyring:
  $RETINAEDGE_TRUSTED_KEY, minus $RETINAEDGE_REVOKED_KEYS) together with a :class:`~edge_runtime.signing.Release`
  whose sequence is not below the installed one (no rollback, even to a release signed by the same key), not below
  any minimum sequence seen, and not expired. Only ``allow_unsigned`` (or $RETINAEDGE_ALLOW_UNSIGNED_MODELS=1), for
  development, installs a model without one, and says so in the log;
- the staged model must pass ``check_artifact`` (sha256, sidecar == embedded manifest, weight types, signature,
  fidelity gate) before ``current`` is switched to it atomically; the previous model stays installed as
  ``previous``, and ``release.json`` records the installed sequence.

Layout under ``dest``::

    versions/<version>-<sha12>/model.onnx (+ .manifest.json)
    current  -> versions/<new>          screen with  dest/current/model.onnx
    previous -> versions/<old>
    release.json                        the installed release's sequence and the highest min_sequence seen
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from .backends.base import TrustedKey, check_artifact, resolve_trusted_key
from .contract import ArtifactManifest, manifest_path_for
from .errors import ArtifactError, ManifestError, ManifestSignatureError, ModelUpdateError
from .formats import runtime_format
from .signing import Release, verify_manifest

log = logging.getLogger(__name__)
SAFE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
STAGING_PREFIX = ".staging-"
ALLOW_UNSIGNED_ENV = "RETINAEDGE_ALLOW_UNSIGNED_MODELS"  # "1": development only, install unsigned models
RELEASE_STATE = "release.json"


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds on what a server can make the device download, and for how long."""

    max_model_bytes: int = 512 * 2**20  # local cap, whatever size the server publishes
    max_latest_bytes: int = 256 * 2**10  # the /latest JSON (a manifest is a few KB)
    deadline_s: float = 900.0  # the whole update, however slowly the bytes arrive
    io_timeout_s: float = 30.0  # connect, and the longest wait for the next bytes
    max_redirects: int = 3  # followed only within the server's origin

    def __post_init__(self) -> None:
        if self.max_model_bytes < 1 or self.max_latest_bytes < 1 or self.deadline_s <= 0 or self.io_timeout_s <= 0 \
                or self.max_redirects < 0:
            raise ValueError(f"update limits must be positive: {self}")


@dataclass(frozen=True)
class InstalledModel:
    path: Path  # dest/current/model<suffix>: the stable path to screen with
    version_path: Path  # the same file under versions/
    previous: Path | None  # the model it replaced, kept for rollback
    manifest: ArtifactManifest


class _Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float]):
        self.seconds, self.clock, self.end = seconds, clock, clock() + seconds

    def check(self, what: str) -> None:
        if self.clock() > self.end:
            raise ModelUpdateError(f"{what} did not finish within the {self.seconds:.0f}s update deadline; "
                                   "the network is too slow or the server is stalling. Keeping the current model.")


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host.lower(), url.port or {"http": 80, "https": 443}.get(url.scheme)


def _send(client: httpx.Client, url: httpx.URL, token: str, origin: tuple, limits: UpdateLimits,
          what: str) -> httpx.Response:
    """GET ``url`` as a stream with the token, following redirects only within ``origin``. Caller closes."""
    for _ in range(limits.max_redirects + 1):
        if _origin(url) != origin:
            raise ModelUpdateError(
                f"{what}: the server pointed to {url.scheme}://{url.host}:{url.port or ''}, not its own origin "
                f"{origin[0]}://{origin[1]}:{origin[2]}; refusing it (the device token is sent only to the server). "
                "Keeping the current model.")
        try:
            response = client.send(client.build_request("GET", url, headers={"Authorization": f"Bearer {token}"}),
                                    stream=True)
        except httpx.HTTPError as exc:
            raise ModelUpdateError(f"{what}: {type(exc).__name__}: {exc}; keeping the current model") from exc
        if not response.is_redirect:
            return response
        location = response.headers.get("location", "")
        response.close()
        if not location:
            raise ModelUpdateError(f"{what}: redirect {response.status_code} without a Location; keeping the current model")
        try:
            url = url.join(location)
        except httpx.InvalidURL as exc:
            raise ModelUpdateError(f"{what}: redirect to an invalid URL {location[:100]!r}") from exc
    raise ModelUpdateError(f"{what}: more than {limits.max_redirects} redirects; keeping the current model")


def _stream(response: httpx.Response, cap: int, deadline: _Deadline, what: str, sink: Callable[[bytes], None]) -> int:
    """Feed the body to ``sink``; refuses more than ``cap`` bytes and checks the deadline after every chunk."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ModelUpdateError(f"{what} is {int(declared):,} bytes, over the {cap:,}-byte limit; keeping the current model")
    received = 0
    try:
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > cap:
                raise ModelUpdateError(f"{what} exceeded {cap:,} bytes; stopped the download, keeping the current model")
            sink(chunk)
            deadline.check(what)
    except httpx.HTTPError as exc:
        raise ModelUpdateError(f"{what} broke off after {received:,} bytes ({type(exc).__name__}); "
                               "keeping the current model") from exc
    return received


def _latest(client: httpx.Client, base: httpx.URL, token: str, fmt: str, origin: tuple, limits: UpdateLimits,
            deadline: _Deadline) -> dict:
    # Relative, so a path prefix such as https://host/retina/ is kept.
    url = base.join("v1/models/latest").copy_merge_params({"format": fmt})
    body = bytearray()
    with closing(_send(client, url, token, origin, limits, "the /latest request")) as response:
        if response.status_code == 404:
            raise ModelUpdateError(f"the server has no {fmt} model yet")
        if response.status_code in (401, 403):
            raise ModelUpdateError(f"the server refused the device token ({response.status_code}); "
                                   "ask an administrator for a new one")
        if response.status_code != 200:
            raise ModelUpdateError(f"the server answered HTTP {response.status_code} to /latest; try again later")
        _stream(response, limits.max_latest_bytes, deadline, "the /latest answer", body.extend)
    try:
        info = json.loads(bytes(body))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deeply
        raise ModelUpdateError("the /latest answer is not JSON, or nested too deeply (a captive portal or proxy "
                               "page?); keeping the current model") from None
    if not isinstance(info, dict):
        raise ModelUpdateError("the /latest answer is not a JSON object; keeping the current model")
    return info


def _check_offer(info: dict, fmt: str, suffix: str, limits: UpdateLimits) -> tuple[dict, ArtifactManifest, int | None]:
    """Validate what /latest published before downloading anything: manifest, sha256, size, names, gate."""
    raw = info.get("manifest")
    try:
        manifest = ArtifactManifest.from_dict(raw)
    except ManifestError as exc:
        raise ModelUpdateError(f"the published manifest is invalid: {exc}") from exc
    if manifest.format != fmt:
        raise ModelUpdateError(f"asked for {fmt!r}, the server published a {manifest.format!r} manifest")
    if manifest.sha256 is None or manifest.sha256 != info.get("sha256"):
        raise ArtifactError("server's manifest and advertised sha256 disagree; refusing the update")
    if not SAFE_VERSION.fullmatch(manifest.model_version):
        raise ModelUpdateError(f"the published model_version {manifest.model_version[:80]!r} is not a plain name "
                               "(letters, digits, . _ + -); refusing the update")
    filename = info.get("filename")
    if not isinstance(filename, str) or not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,200}", filename) \
            or not filename.endswith(suffix):
        raise ModelUpdateError(f"the server sent an unsafe file name {str(filename)[:80]!r} (a path, or not a "
                               f"{suffix} file); refusing the update. Names are never taken from the server.")
    if not manifest.ready:
        raise ModelUpdateError(
            f"the published model's fidelity gate is {str(manifest.gate.status)!r} "
            f"({'; '.join(manifest.gate.failures) or 'no details'}); it must not replace a working model. "
            "Keeping the current model.")
    size = info.get("size_bytes")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ModelUpdateError(f"the server published an invalid size {size!r}; refusing the update")
        if size > limits.max_model_bytes:
            raise ModelUpdateError(f"the published model is {size:,} bytes, over this device's "
                                   f"{limits.max_model_bytes:,}-byte limit; keeping the current model")
    else:
        log.warning("the server does not publish size_bytes; the download is capped at %s bytes", limits.max_model_bytes)
    if not isinstance(info.get("download_url"), str):
        raise ModelUpdateError("the /latest answer has no download_url; refusing the update")
    return raw, manifest, size


def _download(client: httpx.Client, url: httpx.URL, token: str, origin: tuple, limits: UpdateLimits,
              deadline: _Deadline, target: Path, size: int | None) -> str:
    digest = hashlib.sha256()
    with closing(_send(client, url, token, origin, limits, "the model download")) as response, \
            open(target, "wb") as fh:
        if response.status_code != 200:
            raise ModelUpdateError(f"the model download answered HTTP {response.status_code}; keeping the current model")

        def write(chunk: bytes) -> None:
            digest.update(chunk)
            fh.write(chunk)

        received = _stream(response, size or limits.max_model_bytes, deadline, "the model download", write)
        fh.flush()
        os.fsync(fh.fileno())
    if received == 0:
        raise ModelUpdateError("the model download was empty (0 bytes); keeping the current model")
    if size is not None and received != size:
        raise ModelUpdateError(f"the model download ended after {received:,} of {size:,} bytes; keeping the current model")
    return digest.hexdigest()


def _verified(model: Path, trusted_key: TrustedKey) -> None:
    """The checks a screening session makes (gate, format, sha256, embedded manifest, weights, signature)."""
    try:
        check_artifact(model, trusted_key=trusted_key)
    except (ArtifactError, ManifestError) as exc:
        raise ModelUpdateError(f"the downloaded model failed its checks: {exc} Keeping the current model.") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_symlink(link: Path, target: str) -> None:
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}.tmp")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ModelUpdateError(f"cannot switch {link}: {exc}; move it aside (it must be a symlink this tool manages)") from exc


def _switch(dest: Path, version: str) -> Path | None:
    """Point ``current`` at ``versions/<version>`` and ``previous`` at what ``current`` was; returns that."""
    current, target = dest / "current", f"versions/{version}"
    old = os.readlink(current) if current.is_symlink() else None
    if old is not None and old != target:
        _atomic_symlink(dest / "previous", old)
    _atomic_symlink(current, target)
    _fsync_dir(dest)
    previous = dest / "previous"
    return previous.resolve() if previous.is_symlink() else None


def _prune(dest: Path) -> None:
    """Remove installed versions other than current and previous, and staging left by an interrupted update."""
    keep = {(dest / name).resolve() for name in ("current", "previous") if (dest / name).is_symlink()}
    for entry in (dest / "versions").iterdir():
        if entry.is_dir() and entry.resolve() not in keep:
            shutil.rmtree(entry, ignore_errors=True)


def _installed_release(dest: Path) -> dict:
    """{"sequence", "min_sequence", "sha256"} of the installed release; zeros before the first signed install."""
    try:
        state = json.loads((dest / RELEASE_STATE).read_text())
    except FileNotFoundError:
        return {"sequence": -1, "min_sequence": 0, "sha256": None}
    except (OSError, ValueError) as exc:
        raise ModelUpdateError(f"{dest / RELEASE_STATE} is unreadable ({exc}); it guards against rollback, so no "
                               "update is installed until it is restored (or removed by an administrator)") from exc
    if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in ("sequence", "min_sequence")):
        raise ModelUpdateError(f"{dest / RELEASE_STATE} is not a release record; restore it or remove it")
    return state


def _check_release(release: Release | None, sha256: str, state: dict, now: datetime) -> None:
    """Refuse a release without order, expired, withdrawn, or older than the installed one (rollback)."""
    if release is None:
        raise ModelUpdateError("the published manifest is signed without a release (sequence, expiry); the device "
                               "cannot tell it from an older one. The publisher must sign it with a Release. "
                               "Keeping the current model.")
    if now > release.expires_at:
        raise ModelUpdateError(f"the published release {release.sequence} expired at {release.expires_at.isoformat()};"
                               " the server offers a stale model. Keeping the current model.")
    floor = max(state["min_sequence"], state["sequence"])
    if release.sequence < floor or (release.sequence == state["sequence"] and sha256 != state.get("sha256")):
        raise ModelUpdateError(
            f"the published release {release.sequence} is older than what this device allows (installed "
            f"{state['sequence']}, minimum {state['min_sequence']}): a rollback, refused. Keeping the current model.")


def _record_release(dest: Path, release: Release | None, sha256: str, state: dict) -> None:
    if release is None:
        return
    record = {"sequence": release.sequence, "min_sequence": max(state["min_sequence"], release.min_sequence),
              "sha256": sha256}
    tmp = dest / f".{RELEASE_STATE}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, dest / RELEASE_STATE)
    _fsync_dir(dest)


def install_latest_model(server: str, token: str, fmt: str, dest_dir: str | Path,
                         transport: httpx.BaseTransport | None = None, limits: UpdateLimits | None = None,
                         trusted_key: TrustedKey = None, clock: Callable[[], float] = time.monotonic,
                         allow_unsigned: bool | None = None,
                         now: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> InstalledModel:
    """Download, verify and switch to the newest ``fmt`` artifact; the previous model is kept.

    ``trusted_key``: the publisher's Ed25519 public key or a Keyring (default $RETINAEDGE_TRUSTED_KEY); an unsigned
    or altered manifest, a release older than the installed one or an expired one refuses the update. Without a
    trusted key the update is refused unless ``allow_unsigned`` (default $RETINAEDGE_ALLOW_UNSIGNED_MODELS=1), a
    development setting.

    Raises:
        ModelUpdateError: refused offer (origin, names, size, deadline, gate, format, redirects, empty body).
        ArtifactError, ManifestError: the download does not match the published sha256 or manifest.
    """
    limits = limits or UpdateLimits()
    spec = runtime_format(fmt)
    if spec.is_directory:
        raise ModelUpdateError(f"{fmt} artifacts are directories and cannot be downloaded as one file")
    try:
        base = httpx.URL(server.rstrip("/") + "/")
    except httpx.InvalidURL as exc:
        raise ModelUpdateError(f"invalid server URL {server!r}: {exc}") from exc
    if base.scheme not in ("http", "https") or not base.host:
        raise ModelUpdateError(f"server URL must be http(s)://host[:port], got {server!r}")
    origin, deadline = _origin(base), _Deadline(limits.deadline_s, clock)
    dest = Path(dest_dir)
    versions = dest / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    timeout = httpx.Timeout(min(limits.io_timeout_s, limits.deadline_s))
    key = resolve_trusted_key(trusted_key)
    if allow_unsigned is None:
        allow_unsigned = os.environ.get(ALLOW_UNSIGNED_ENV, "").strip() == "1"
    if key is None and not allow_unsigned:
        raise ModelUpdateError(
            "no publisher key is trusted, and this device installs signed models only: set RETINAEDGE_TRUSTED_KEY "
            f"(--trusted-key) to the publisher's public key(s). For development only, {ALLOW_UNSIGNED_ENV}=1 "
            "installs unsigned models.")
    state = _installed_release(dest)
    release = None
    with httpx.Client(timeout=timeout, transport=transport, follow_redirects=False) as client:
        info = _latest(client, base, token, fmt, origin, limits, deadline)
        raw, manifest, size = _check_offer(info, fmt, spec.suffix, limits)
        if key is not None:  # before the download; check_artifact checks it again on the staged file
            try:
                release = verify_manifest(raw, key, what="the published manifest")
            except ManifestSignatureError as exc:
                raise ModelUpdateError(f"{exc}. Keeping the current model.") from exc
            _check_release(release, manifest.sha256, state, now())
        else:
            log.warning("installing an UNSIGNED model (%s): development setting %s", manifest.model_version,
                        ALLOW_UNSIGNED_ENV)
        staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=versions))
        try:
            model = staging / f"model{spec.suffix}"
            try:
                url = base.join(info["download_url"])
            except httpx.InvalidURL as exc:
                raise ModelUpdateError(f"the published download_url is invalid ({exc}); refusing the update") from exc
            actual = _download(client, url, token, origin, limits, deadline, model, size)
            if actual != manifest.sha256:
                raise ArtifactError(f"downloaded model has sha256 {actual[:12]}..., expected {manifest.sha256[:12]}...; "
                                    "keeping the current model")
            manifest_path_for(model).write_text(json.dumps(raw, indent=2, sort_keys=True))
            _verified(model, key)
            final = versions / f"{manifest.model_version}-{manifest.sha256[:12]}"
            if final.exists():  # the same model again: keep the installed copy unless it no longer verifies
                try:
                    _verified(final / model.name, key)
                except ModelUpdateError:
                    trash = final.rename(versions / f"{STAGING_PREFIX}old-{uuid.uuid4().hex}")
                    os.replace(staging, final)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staging, final)
            _fsync_dir(versions)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    previous = _switch(dest, final.name)
    _record_release(dest, release, manifest.sha256, state)
    _prune(dest)
    installed = dest / "current" / model.name
    log.info("installed %s (%s), previous %s", manifest.model_version, manifest.sha256[:12], previous)
    return InstalledModel(installed, final / model.name, previous / model.name if previous else None, manifest)


def fetch_latest_model(server: str, token: str, fmt: str, dest_dir: str | Path,
                       transport: httpx.BaseTransport | None = None, timeout: float | None = None,
                       limits: UpdateLimits | None = None, trusted_key: TrustedKey = None,
                       allow_unsigned: bool | None = None) -> Path:
    """``install_latest_model``, returning the stable path to screen with (``dest/current/model<suffix>``)."""
    if timeout is not None:
        limits = dataclasses.replace(limits or UpdateLimits(), io_timeout_s=timeout)
    return install_latest_model(server, token, fmt, dest_dir, transport, limits, trusted_key,
                                allow_unsigned=allow_unsigned).path
