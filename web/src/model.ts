// Model distribution in the browser: the device runtime's checks (edge_runtime.updates) before a model is used.
// /v1/models/latest?format=F for each format the app runs (runtime.PREFERENCE) -> the publisher's Ed25519
// signature over the manifest (against the pinned key), the fidelity gate (an ungated artifact is refused), the
// signed release; then the download's sha256 against the signed manifest. Only then is the pair stored (Cache
// Storage, beside the app shell the service worker keeps) and opened with the format's runtime.
import { ed25519Verify } from "./ed25519";
import { Manifest, manifestReady } from "./contract";
import { Bytes, parseKeepingNumbers, plain, pyDumps, sha256Hex } from "./pyjson";
import { backendFor } from "./runtime";

export const MODEL_CACHE = "retinaedge-model-v1";
const MANIFEST_URL = "model/manifest.json"; // under the app's scope, so the service worker never fetches them
const ARTIFACT_URL = "model/artifact";
const LEGACY_ARTIFACT_URL = "model/artifact.onnx"; // where an app that ran only ONNX kept it
export const MAX_MODEL_BYTES = 64 * 2 ** 20; // a phone artifact is a few MB
const MAX_LATEST_BYTES = 256 * 2 ** 10;

export class ModelRefusedError extends Error {}

export interface VerifiedModel { manifest: Manifest; rawManifest: unknown; bytes: Bytes }

function b64(text: string): Bytes {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

/** The publisher's signed place of a model among its releases (edge_runtime.signing.Release). */
export interface Release { sequence: number; min_sequence: number; expires_at: string }

const RELEASE_CONTEXT = "retinaedge-release-v1\n";

/** The publisher keys the app pinned at setup (raw Ed25519 keys in base64 by key id) and revoked key ids. */
export interface Keyring { keys: Record<string, string>; revoked: string[] }

/** key_id of edge_runtime.signing: the first 16 hex digits of the sha256 of the raw public key. */
export async function keyId(rawKeyB64: string): Promise<string> {
  return (await sha256Hex(b64(rawKeyB64))).slice(0, 16);
}

/** verify_manifest: the signature over the manifest's canonical bytes (no signature field, sorted, compact), with
 *  the signed release in front of them when the signature carries one, by a trusted and unrevoked key; returns
 *  that release. */
export async function verifyManifestSignature(raw: unknown, keyring: Keyring): Promise<Release | null> {
  if (!raw || typeof raw !== "object" || Array.isArray(raw)) throw new ModelRefusedError("the manifest is not a JSON object");
  const { signature, ...unsigned } = raw as Record<string, unknown>;
  if (!signature) throw new ModelRefusedError("the manifest is unsigned; this app trusts only the publisher's signed manifests");
  const sig = plain<{ algorithm?: string; key_id?: string; value?: string; release?: Release }>(signature);
  const extra = Object.keys(sig).filter((k) => !["algorithm", "key_id", "value", "release"].includes(k));
  if (sig.algorithm !== "ed25519" || typeof sig.value !== "string" || extra.length) {
    throw new ModelRefusedError("the manifest has a malformed signature (expected ed25519)");
  }
  let release: Release | null = null;
  let prefix = "";
  if (sig.release !== undefined) {
    const r = sig.release;
    const keys = r && typeof r === "object" ? Object.keys(r).sort().join() : "";
    if (keys !== "expires_at,min_sequence,sequence" || !Number.isInteger(r.sequence) || !Number.isInteger(r.min_sequence)
        || r.sequence < 0 || r.min_sequence < 0 || r.min_sequence > r.sequence || Number.isNaN(Date.parse(r.expires_at))) {
      throw new ModelRefusedError("the manifest's signed release is malformed (sequence, min_sequence, expires_at)");
    }
    release = r;
    prefix = RELEASE_CONTEXT + pyDumps((signature as Record<string, unknown>).release, { compact: true }) + "\n";
  }
  let value: Bytes;
  try { value = b64(sig.value); } catch { throw new ModelRefusedError("the manifest signature is not base64"); }
  const signer = String(sig.key_id ?? "");
  if (keyring.revoked.includes(signer)) {
    throw new ModelRefusedError(`the manifest is signed by key ${signer}, which is revoked; refusing it`);
  }
  const key = Object.hasOwn(keyring.keys, signer) ? keyring.keys[signer] : undefined;
  if (!key) {
    throw new ModelRefusedError(`the manifest is signed by key ${signer.slice(0, 40)}, not one this phone trusts (${Object.keys(keyring.keys).join(", ") || "none"}); refusing it`);
  }
  const message = new TextEncoder().encode(prefix + pyDumps(unsigned, { compact: true }));
  if (!(await ed25519Verify(b64(key), value, message))) {
    throw new ModelRefusedError("the manifest signature does not verify against the pinned publisher key (forged or altered); refusing it");
  }
  return release;
}

export interface ReleaseState { sequence: number; min_sequence: number; sha256: string | null }

/** _check_release of edge_runtime.updates: refuse an offer without a release, expired, withdrawn, or older than
 *  the installed one (a rollback, even to a release signed by the same key). */
export function checkRelease(release: Release | null, sha256: string, state: ReleaseState, now = new Date()): void {
  if (!release) {
    throw new ModelRefusedError("the published manifest is signed without a release (sequence, expiry), so it cannot be told from an older one; the publisher must sign it with a release");
  }
  if (now.getTime() > Date.parse(release.expires_at)) {
    throw new ModelRefusedError(`the published release ${release.sequence} expired at ${release.expires_at}; the server offers a stale model`);
  }
  const floor = Math.max(state.min_sequence, state.sequence);
  if (release.sequence < floor || (release.sequence === state.sequence && sha256 !== state.sha256)) {
    throw new ModelRefusedError(`the published release ${release.sequence} is older than this phone allows (installed ${state.sequence}, minimum ${state.min_sequence}): a rollback, refused`);
  }
}

/** The checks every model passes before it is used, downloaded now or read back from the cache. */
export async function checkModel(raw: unknown, bytes: Bytes, keyring: Keyring): Promise<Manifest> {
  await verifyManifestSignature(raw, keyring);
  const manifest = plain<Manifest>(raw);
  try { backendFor(manifest.format); } catch (err) { throw new ModelRefusedError((err as Error).message); }
  if (!manifestReady(manifest)) {
    throw new ModelRefusedError(`the artifact's fidelity gate is '${manifest.gate?.status}' (${(manifest.gate?.failures ?? []).join("; ") || "no details"}); an ungated artifact is never used`);
  }
  const actual = await sha256Hex(bytes);
  if (actual !== manifest.sha256) {
    throw new ModelRefusedError(`the model file has sha256 ${actual.slice(0, 12)}..., its signed manifest says ${String(manifest.sha256).slice(0, 12)}...`);
  }
  return manifest;
}

async function boundedBody(response: Response, cap: number, what: string): Promise<Bytes> {
  const declared = Number(response.headers.get("content-length") ?? "NaN");
  if (declared > cap) throw new ModelRefusedError(`${what} is ${declared} bytes, over the ${cap}-byte limit`);
  const reader = response.body!.getReader();
  const parts: Uint8Array[] = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    received += value.length;
    if (received > cap) { await reader.cancel(); throw new ModelRefusedError(`${what} exceeded ${cap} bytes`); }
    parts.push(value);
  }
  const out = new Uint8Array(received);
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** What the server offers for one format, its manifest already checked (signature, gate, release). */
export interface Offer { format: string; raw: unknown; manifest: Manifest; release: Release; downloadUrl: URL }

/** The server's newest release of ``format``, checked before anything it names is downloaded; null when the
 *  server has none of that format. ``state`` is the installed release of that format (sequence -1 before any). */
export async function offered(token: string, keyring: Keyring, format: string, state: ReleaseState): Promise<Offer | null> {
  const headers = { Authorization: `Bearer ${token}` };
  const latest = await fetch(`/v1/models/latest?format=${encodeURIComponent(format)}`, { headers, cache: "no-store" });
  if (latest.status === 404) return null;
  if (!latest.ok) throw new ModelRefusedError(`the server's ${format} model answered HTTP ${latest.status}`);
  const info = parseKeepingNumbers(new TextDecoder().decode(await boundedBody(latest, MAX_LATEST_BYTES, "the /latest answer"))) as Record<string, unknown>;
  const raw = info.manifest;
  const release = await verifyManifestSignature(raw, keyring);
  const manifest = plain<Manifest>(raw);
  if (manifest.format !== format) throw new ModelRefusedError(`asked for a ${format} model, the server offered ${manifest.format}`);
  if (!manifestReady(manifest)) await checkModel(raw, new Uint8Array(), keyring); // throws the gate's reason
  checkRelease(release, String(manifest.sha256), state);
  const downloadUrl = new URL(String(info.download_url), location.origin);
  if (downloadUrl.origin !== location.origin) throw new ModelRefusedError(`the download points to ${downloadUrl.origin}, not this server; refusing it`);
  return { format, raw, manifest, release: release!, downloadUrl };
}

/** Download an offer, check it again with its bytes (signature, gate, sha256) and store it as the phone's model;
 *  the stored one stays if anything fails. */
export async function downloadOffer(offer: Offer, token: string, keyring: Keyring): Promise<VerifiedModel> {
  const download = await fetch(offer.downloadUrl, { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  if (!download.ok) throw new ModelRefusedError(`the model download answered HTTP ${download.status}`);
  const bytes = await boundedBody(download, MAX_MODEL_BYTES, "the model");
  return { manifest: await checkModel(offer.raw, bytes, keyring), rawManifest: offer.raw, bytes };
}

export async function storeModel(model: VerifiedModel): Promise<void> {
  const cache = await caches.open(MODEL_CACHE);
  await cache.put(ARTIFACT_URL, new Response(model.bytes, { headers: { "Content-Type": "application/octet-stream" } }));
  await cache.put(MANIFEST_URL, new Response(rawText(model.rawManifest), { headers: { "Content-Type": "application/json" } }));
  await cache.delete(LEGACY_ARTIFACT_URL);
}

function rawText(raw: unknown): string {
  return pyDumps(raw, { compact: true }); // number texts kept: the signature still verifies when read back
}

/** The stored model, checked again (signature, gate, sha256) before use; null when none is stored. */
export async function storedModel(keyring: Keyring): Promise<VerifiedModel | null> {
  const cache = await caches.open(MODEL_CACHE);
  const [m, a] = await Promise.all([cache.match(MANIFEST_URL),
                                    cache.match(ARTIFACT_URL).then((r) => r ?? cache.match(LEGACY_ARTIFACT_URL))]);
  if (!m || !a) return null;
  const raw = parseKeepingNumbers(await m.text());
  const bytes = new Uint8Array(await a.arrayBuffer());
  return { manifest: await checkModel(raw, bytes, keyring), rawManifest: raw, bytes };
}
