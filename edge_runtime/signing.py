"""Ed25519 signatures over artifact manifests: the publisher signs at export, devices verify before screening.

What is signed is the manifest's canonical JSON (sorted keys, no whitespace, ASCII) without its ``signature`` field.
NaN gate metrics are written as ``NaN`` (Python's JSON). The sidecar's signature covers the model's sha256, so a signed sidecar binds every byte of the file; the copy
embedded in the file carries ``sha256: null`` (a file cannot hold its own hash) and its own signature.

Torch-free and small on purpose; ``cryptography`` is imported only when a key is used, so devices without a
configured key do not need it. Typical use::

    private_pem, public_pem = generate_key_pair()          # once, by the publisher; keep private_pem secret
    signed = sign_manifest(manifest.to_dict(), load_private_key(private_pem))
    verify_manifest(signed, load_public_key(public_pem))   # raises ManifestSignatureError
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ManifestSignatureError, SigningUnavailableError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
SIGNATURE_FIELD = "signature"
TRUSTED_KEY_ENV = "RETINAEDGE_TRUSTED_KEY"  # the publisher's public key: a PEM file path, PEM text or raw base64
SIGNING_KEY_ENV = "RETINAEDGE_SIGNING_KEY"  # the publisher's private key (PEM file path) for exporters


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise SigningUnavailableError(
            "manifest signatures need the 'cryptography' package: pip install 'retinaedge[edge]'") from exc
    return ed25519


def _serialization():
    _ed25519()
    from cryptography.hazmat.primitives import serialization

    return serialization


def generate_key_pair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    serialization = _serialization()
    private = _ed25519().Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def _key_bytes(key: str | bytes | Path) -> bytes:
    """PEM text/bytes as given, or the contents of the file a path (or path-like string) names."""
    if isinstance(key, Path):
        return key.read_bytes()
    text = key.decode() if isinstance(key, bytes) else key
    if "-----BEGIN" in text:
        return text.encode()
    if os.path.isfile(text):
        return Path(text).read_bytes()
    return text.strip().encode()


def load_private_key(key: str | bytes | Path | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM text/bytes or a PEM file (unencrypted PKCS#8)."""
    ed25519 = _ed25519()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    try:
        loaded = _serialization().load_pem_private_key(_key_bytes(key), password=None)
    except (ValueError, TypeError, OSError) as exc:
        raise ManifestSignatureError(f"cannot read the Ed25519 private key: {exc}") from exc
    if not isinstance(loaded, ed25519.Ed25519PrivateKey):
        raise ManifestSignatureError(f"the signing key is {type(loaded).__name__}, not Ed25519; create one with "
                                     "edge_runtime.signing.generate_key_pair()")
    return loaded


def load_public_key(key: str | bytes | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text/bytes, a PEM file, or the raw 32-byte key in base64."""
    ed25519 = _ed25519()
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    try:
        data = _key_bytes(key)
        if data.startswith(b"-----BEGIN"):
            loaded = _serialization().load_pem_public_key(data)
        else:
            loaded = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(data, validate=True))
    except (ValueError, TypeError, OSError, binascii.Error) as exc:
        raise ManifestSignatureError(
            f"cannot read the trusted public key ({exc}); give a PEM file, PEM text or the raw key in base64") from exc
    if not isinstance(loaded, ed25519.Ed25519PublicKey):
        raise ManifestSignatureError(f"the trusted key is {type(loaded).__name__}, not Ed25519")
    return loaded


def trusted_key_from_env() -> Ed25519PublicKey | None:
    """The publisher key named by $RETINAEDGE_TRUSTED_KEY, or None when the variable is unset or empty."""
    value = os.environ.get(TRUSTED_KEY_ENV, "").strip()
    return load_public_key(value) if value else None


def signing_key_from_env() -> Ed25519PrivateKey | None:
    """The publisher's private key named by $RETINAEDGE_SIGNING_KEY (exporters), or None when unset or empty."""
    value = os.environ.get(SIGNING_KEY_ENV, "").strip()
    return load_private_key(value) if value else None


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key (first 16 hex of the sha256 of its raw bytes), shown in errors."""
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def canonical_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest without its signature, sorted keys, compact, ASCII, NaN as NaN."""
    if not isinstance(manifest, Mapping):
        raise ManifestSignatureError(f"a manifest to sign must be a JSON object, got {type(manifest).__name__}")
    unsigned = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    try:
        # allow_nan: gate metrics can be NaN (e.g. a QWK ratio on one class); Python writes them as NaN.
        return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    except (TypeError, ValueError) as exc:
        raise ManifestSignatureError(f"manifest cannot be canonicalised for signing: {exc}") from exc


def sign_manifest(manifest: Mapping[str, Any], private_key: str | bytes | Path | Ed25519PrivateKey) -> dict[str, Any]:
    """A copy of ``manifest`` (a JSON-ready dict, e.g. ``ArtifactManifest.to_dict()``) with its ``signature``."""
    key = load_private_key(private_key)
    value = key.sign(canonical_manifest_bytes(manifest))
    signature = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()), "value": base64.b64encode(value).decode()}
    return {**{k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}, SIGNATURE_FIELD: signature}


def verify_manifest(manifest: Mapping[str, Any], public_key: str | bytes | Path | Ed25519PublicKey,
                    what: str = "manifest") -> None:
    """Check ``manifest['signature']`` against the publisher's key.

    Raises:
        ManifestSignatureError: unsigned, malformed signature, signed by another key, or altered after signing.
    """
    key = load_public_key(public_key)
    signature = manifest.get(SIGNATURE_FIELD) if isinstance(manifest, Mapping) else None
    if signature is None:
        raise ManifestSignatureError(
            f"{what} is unsigned but this device trusts only manifests signed by key {key_id(key)}; "
            "re-export with a signing key (RETINAEDGE_SIGNING_KEY) or remove the trusted key for local testing")
    if not isinstance(signature, Mapping) or signature.get("algorithm") != ALGORITHM \
            or not isinstance(signature.get("value"), str):
        raise ManifestSignatureError(f"{what} has a malformed signature (expected {{'algorithm': 'ed25519', "
                                     f"'key_id': ..., 'value': base64}}); re-export it")
    try:
        raw = base64.b64decode(signature["value"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ManifestSignatureError(f"{what} signature is not base64; re-export it") from exc
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(raw, canonical_manifest_bytes(manifest))
    except InvalidSignature as exc:
        signer = signature.get("key_id")
        hint = (f"it was signed by key {signer}, this device trusts {key_id(key)}" if signer != key_id(key)
                else "its content was changed after signing")
        raise ManifestSignatureError(f"{what} signature does not verify ({hint}); refusing it") from exc
