"""Ed25519 signatures over artifact manifests: the publisher signs at export, devices verify before screening.

What is signed is the manifest's canonical JSON (sorted keys, no whitespace, ASCII) without its ``signature`` field.
NaN gate metrics are written as ``NaN`` (Python's JSON). The sidecar's signature covers the model's sha256, so a signed sidecar binds every byte of the file; the copy
embedded in the file carries ``sha256: null`` (a file cannot hold its own hash) and its own signature.

A published model also carries a signed :class:`Release` inside its signature block: a sequence number that only
grows, the lowest sequence devices may still install, and an expiry. The signature then covers the manifest *and*
the release, so a server cannot replay an older release signed by the same key (rollback), strip the release, or
keep serving a withdrawn one forever. Devices trust a :class:`Keyring` (several publisher keys, for rotation, and
the ids of revoked ones).

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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ManifestSignatureError, SigningUnavailableError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
SIGNATURE_FIELD = "signature"
TRUSTED_KEY_ENV = "RETINAEDGE_TRUSTED_KEY"  # publisher public keys: PEM file paths, PEM text or raw base64 (several: ,)
REVOKED_KEYS_ENV = "RETINAEDGE_REVOKED_KEYS"  # key ids (key_id()) no longer trusted, comma-separated
RELEASE_FIELD = "release"  # inside the signature block: the signed Release
_RELEASE_CONTEXT = b"retinaedge-release-v1\n"  # domain separation: a release signature is never a bare manifest's
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


def load_public_key(key: str | bytes | Path | Ed25519PublicKey | Keyring) -> Ed25519PublicKey | Keyring:
    """An Ed25519 public key from PEM text/bytes, a PEM file, or the raw 32-byte key in base64 (a Keyring is
    returned as it is)."""
    ed25519 = _ed25519()
    if isinstance(key, (ed25519.Ed25519PublicKey, Keyring)):
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


def trusted_key_from_env() -> Keyring | None:
    """The publisher keys named by $RETINAEDGE_TRUSTED_KEY (minus $RETINAEDGE_REVOKED_KEYS), or None when unset."""
    value = os.environ.get(TRUSTED_KEY_ENV, "").strip()
    return load_keyring(value, os.environ.get(REVOKED_KEYS_ENV, "")) if value else None


def signing_key_from_env() -> Ed25519PrivateKey | None:
    """The publisher's private key named by $RETINAEDGE_SIGNING_KEY (exporters), or None when unset or empty."""
    value = os.environ.get(SIGNING_KEY_ENV, "").strip()
    return load_private_key(value) if value else None


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key (first 16 hex of the sha256 of its raw bytes), shown in errors."""
    serialization = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class Release:
    """Where a published model stands among the publisher's releases (signed with the manifest)."""

    sequence: int  # grows with every release of a channel; a device never installs a lower one than it has
    expires_at: datetime  # after this the offer is refused: a stale or captured server cannot serve it forever
    min_sequence: int = 0  # the lowest sequence still allowed anywhere (withdraws older releases)

    def __post_init__(self) -> None:
        for name in ("sequence", "min_sequence"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
                raise ManifestSignatureError(f"release.{name} must be a whole number >= 0, got {value!r}")
        if self.min_sequence > self.sequence:
            raise ManifestSignatureError(f"release.min_sequence {self.min_sequence} is above its sequence {self.sequence}")
        if not isinstance(self.expires_at, datetime) or self.expires_at.tzinfo is None:
            raise ManifestSignatureError("release.expires_at must be a timezone-aware time")

    def to_dict(self) -> dict[str, Any]:
        return {"sequence": self.sequence, "min_sequence": self.min_sequence,
                "expires_at": self.expires_at.astimezone(timezone.utc).isoformat()}

    @classmethod
    def from_dict(cls, data: Any) -> Release:
        if not isinstance(data, Mapping) or set(data) != {"sequence", "min_sequence", "expires_at"}:
            raise ManifestSignatureError("the signed release must hold exactly sequence, min_sequence and expires_at")
        try:
            expires = datetime.fromisoformat(data["expires_at"]) if isinstance(data["expires_at"], str) else None
        except ValueError:
            expires = None
        if expires is None:
            raise ManifestSignatureError("release.expires_at must be an ISO 8601 time with a UTC offset")
        return cls(data["sequence"], expires, data["min_sequence"])

    def canonical_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Keyring:
    """The publisher keys a device trusts (several while a key is rotated) and the ids of revoked ones."""

    keys: dict[str, Any] = field(default_factory=dict)  # key_id -> Ed25519PublicKey
    revoked: frozenset[str] = frozenset()

    @classmethod
    def of(cls, *keys: Any, revoked: frozenset[str] | set[str] = frozenset()) -> Keyring:
        loaded = [load_public_key(k) for k in keys]
        return cls({key_id(k): k for k in loaded}, frozenset(revoked))

    def describe(self) -> str:
        return ", ".join(sorted(self.keys)) or "none"


def load_keyring(value: str | bytes | Path, revoked: str = "") -> Keyring:
    """Several public keys: PEM blocks in one text or file, or comma-separated PEM paths / raw base64 keys;
    ``revoked``: comma-separated key ids."""
    data = _key_bytes(value) if not isinstance(value, str) or "-----BEGIN" in value or os.path.isfile(value) else None
    if data is not None and b"-----BEGIN" in data:
        items: list[Any] = [m.group(0) for m in re.finditer(rb"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----",
                                                            data, re.S)]
        if not items:
            raise ManifestSignatureError("no public key found in the trusted keys (expected PEM PUBLIC KEY blocks)")
    else:
        text = value.decode() if isinstance(value, bytes) else str(value)
        items = [part.strip() for part in text.split(",") if part.strip()]
    return Keyring.of(*items, revoked={r.strip() for r in revoked.split(",") if r.strip()})


def canonical_manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the manifest without its signature, sorted keys, compact, ASCII, NaN as NaN."""
    if not isinstance(manifest, Mapping):
        raise ManifestSignatureError(f"a manifest to sign must be a JSON object, got {type(manifest).__name__}")
    unsigned = {k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}
    try:
        # allow_nan: gate metrics can be NaN (e.g. a QWK ratio on one class); Python writes them as NaN.
        return json.dumps(unsigned, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise ManifestSignatureError(f"manifest cannot be canonicalised for signing: {str(exc)[:200]}") from None


def _signed_bytes(manifest: Mapping[str, Any], release: Release | None) -> bytes:
    body = canonical_manifest_bytes(manifest)
    return body if release is None else _RELEASE_CONTEXT + release.canonical_bytes() + b"\n" + body


def sign_manifest(manifest: Mapping[str, Any], private_key: str | bytes | Path | Ed25519PrivateKey,
                  release: Release | None = None) -> dict[str, Any]:
    """A copy of ``manifest`` (a JSON-ready dict, e.g. ``ArtifactManifest.to_dict()``) with its ``signature``;
    with ``release``, the signature also covers it (what a publisher does before uploading a model)."""
    key = load_private_key(private_key)
    value = key.sign(_signed_bytes(manifest, release))
    signature = {"algorithm": ALGORITHM, "key_id": key_id(key.public_key()), "value": base64.b64encode(value).decode()}
    if release is not None:
        signature[RELEASE_FIELD] = release.to_dict()
    return {**{k: v for k, v in manifest.items() if k != SIGNATURE_FIELD}, SIGNATURE_FIELD: signature}


def _verifying_key(signature: Mapping[str, Any], trusted: Ed25519PublicKey | Keyring, what: str) -> Ed25519PublicKey:
    signer = signature.get("key_id")
    if not isinstance(trusted, Keyring):
        return trusted
    if signer in trusted.revoked:
        raise ManifestSignatureError(f"{what} is signed by key {signer}, which is revoked on this device; "
                                     "refusing it (the publisher must re-sign with a current key)")
    key = trusted.keys.get(signer) if isinstance(signer, str) else None
    if key is None:
        raise ManifestSignatureError(f"{what} is signed by key {str(signer)[:40]}, not one this device trusts "
                                     f"({trusted.describe()}); refusing it")
    return key


def verify_manifest(manifest: Mapping[str, Any], public_key: str | bytes | Path | Ed25519PublicKey | Keyring,
                    what: str = "manifest") -> Release | None:
    """Check ``manifest['signature']`` against the publisher's key or keyring; returns the signed Release (None for
    a signature without one).

    Raises:
        ManifestSignatureError: unsigned, malformed signature, signed by another or a revoked key, or altered
            after signing (the release included).
    """
    trusted = load_public_key(public_key)
    described = trusted.describe() if isinstance(trusted, Keyring) else key_id(trusted)
    signature = manifest.get(SIGNATURE_FIELD) if isinstance(manifest, Mapping) else None
    if signature is None:
        raise ManifestSignatureError(
            f"{what} is unsigned but this device trusts only manifests signed by key {described}; "
            "re-export with a signing key (RETINAEDGE_SIGNING_KEY) or remove the trusted key for local testing")
    if not isinstance(signature, Mapping) or signature.get("algorithm") != ALGORITHM \
            or not isinstance(signature.get("value"), str) or not set(signature) <= {"algorithm", "key_id", "value",
                                                                                      RELEASE_FIELD}:
        raise ManifestSignatureError(f"{what} has a malformed signature (expected {{'algorithm': 'ed25519', "
                                     f"'key_id': ..., 'value': base64[, 'release': ...]}}); re-export it")
    release = Release.from_dict(signature[RELEASE_FIELD]) if RELEASE_FIELD in signature else None
    key = _verifying_key(signature, trusted, what)
    try:
        raw = base64.b64decode(signature["value"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ManifestSignatureError(f"{what} signature is not base64; re-export it") from exc
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(raw, _signed_bytes(manifest, release))
    except InvalidSignature as exc:
        signer = signature.get("key_id")
        hint = (f"it was signed by key {signer}, this device trusts {described}" if signer != key_id(key)
                else "its content (or its release) was changed after signing")
        raise ManifestSignatureError(f"{what} signature does not verify ({hint}); refusing it") from exc
    return release
