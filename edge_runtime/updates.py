"""Model distribution on the device: fetch the latest artifact from the companion server and switch to it only
after its sha256 matches the manifest the server published."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx

from .contract import ArtifactManifest, manifest_path_for
from .errors import ArtifactError


def fetch_latest_model(server: str, token: str, fmt: str, dest_dir: str | Path,
                       transport: httpx.BaseTransport | None = None, timeout: float = 120.0) -> Path:
    """Download the newest ``fmt`` artifact into ``dest_dir``; returns its path.

    The file is written to a temporary name, verified, then atomically renamed together with its manifest,
    so a device never screens with a partial or tampered download.

    Raises:
        ArtifactError: the download does not match the published sha256 or manifest.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with httpx.Client(base_url=server.rstrip("/"), headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                      transport=transport) as client:
        latest = client.get("/v1/models/latest", params={"format": fmt})
        latest.raise_for_status()
        info = latest.json()
        manifest = ArtifactManifest.from_dict(info["manifest"])
        if manifest.sha256 != info["sha256"]:
            raise ArtifactError("server's manifest and advertised sha256 disagree; refusing the update")
        target = dest_dir / info["filename"]
        partial = target.with_name(target.name + ".part")
        digest = hashlib.sha256()
        with client.stream("GET", info["download_url"]) as response, open(partial, "wb") as fh:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                digest.update(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    if digest.hexdigest() != manifest.sha256:
        partial.unlink(missing_ok=True)
        raise ArtifactError(f"downloaded {target.name} has sha256 {digest.hexdigest()[:12]}..., expected "
                            f"{manifest.sha256[:12]}...; keeping the current model")
    sidecar = manifest_path_for(target)
    sidecar_tmp = sidecar.with_name(sidecar.name + ".part")
    sidecar_tmp.write_text(manifest.to_json())
    os.replace(partial, target)
    os.replace(sidecar_tmp, sidecar)
    return target
