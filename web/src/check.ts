// The page the golden-fixture tests and benchmarks/browser_speed.py drive (not part of the installed app): it runs
// the app's own modules on photos the test hands it and returns every intermediate the Python runtime is compared on.
import { checkModel, keyId } from "./model";
import { parseKeepingNumbers, plain } from "./pyjson";
import type { Manifest } from "./contract";
import { ModelSession, PREFERENCE } from "./runtime";
import "./runtime_litert";
import "./runtime_ort";
import { analyse, decodeBlob, decodeSide, screen } from "./screen";
import { canonicalJson } from "./result";

const fromB64 = (s: string): Uint8Array<ArrayBuffer> => { const r = atob(s); const o = new Uint8Array(r.length); for (let i = 0; i < r.length; i++) o[i] = r.charCodeAt(i); return o; };
function toB64(bytes: Uint8Array): string {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}
const f32b64 = (a: Float32Array) => toB64(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));

let session: ModelSession | null = null;
const timing = new Map<string, ModelSession>();

const api = {
  crossOriginIsolated: () => self.crossOriginIsolated,
  /** Open a model after the app's own checks (signature against ``keyB64``, gate, sha256). */
  async open(modelB64: string, manifestText: string, keyB64: string, threads?: number) {
    const bytes = fromB64(modelB64);
    const manifest = await checkModel(parseKeepingNumbers(manifestText), bytes, { keys: { [await keyId(keyB64)]: keyB64 }, revoked: [] });
    session = await ModelSession.open(bytes, manifest, { threads });
    return session.info;
  },
  /** Open any artifact without the app's checks, for timing only (benchmarks/browser_speed.py), kept under
   *  ``name`` beside the others so that timing rounds can visit every artifact in turn; the app itself opens
   *  nothing that has not passed checkModel. */
  async openForTiming(name: string, modelB64: string, manifestText: string, threads?: number) {
    const opened = await ModelSession.open(fromB64(modelB64), plain<Manifest>(parseKeepingNumbers(manifestText)), { threads });
    timing.set(name, opened);
    return opened.info;
  },
  /** The app's preference table (runtime.PREFERENCE) and what this browser offers besides WASM. */
  async environment() {
    const gpu = (navigator as unknown as { gpu?: { requestAdapter(): Promise<unknown> } }).gpu;
    let webgpu = "no navigator.gpu";
    if (gpu) webgpu = (await gpu.requestAdapter().catch(() => null)) ? "adapter available" : "no adapter";
    return { preference: PREFERENCE, webgpu, isolated: self.crossOriginIsolated, cores: navigator.hardwareConcurrency };
  },
  /** Everything the fixtures hold for one photo. */
  decodeSide: () => decodeSide(session!.manifest.preprocess),
  async analyse(photoB64: string, mime: string) {
    const started = performance.now();
    const bgr = await decodeBlob(new Blob([fromB64(photoB64)], { type: mime }), decodeSide(session!.manifest.preprocess));
    const decodeMs = performance.now() - started;
    const parts = await analyse(bgr, session!);
    const d = parts.decision;
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", new Uint8Array(bgr.data)));
    return {
      decode_ms: decodeMs,
      decoded_sha256: Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join(""),
      size: [bgr.w, bgr.h],
      fov: parts.fov ? [parts.fov.x, parts.fov.y, parts.fov.w, parts.fov.h] : null,
      quality: parts.quality,
      tensor: parts.pre ? f32b64(parts.pre.tensor) : null,
      crop_box: parts.pre?.cropBox ?? null,
      logits: parts.logits ? Array.from(parts.logits) : null,
      decision: d ? { grade: d.grade, probabilities: d.probabilities, referable_probability: d.referableProbability,
                      referable: d.referable, uncertain: d.uncertain, outcome: d.outcome, cam_peak: d.camPeak } : null,
    };
  },
  /** Samples (ms) of ``n`` inferences and ``steps`` whole steps (decode .. outbox commit, each with its stages) of
   *  the artifact opened as ``name`` on one photo. */
  async time(name: string, photoB64: string, mime: string, n: number, steps: number) {
    const model = timing.get(name);
    if (!model) throw new Error(`no artifact opened as ${name}`);
    const blob = new Blob([fromB64(photoB64)], { type: mime });
    const side = decodeSide(model.manifest.preprocess);
    const parts = await analyse(await decodeBlob(blob, side), model);
    if (!parts.pre) throw new Error("the timing photo is ungradable: the step would stop before inference");
    const tensor = parts.pre.tensor;
    await model.run(tensor);
    const infer: number[] = [], step: number[] = [], stages: Record<string, number>[] = [];
    for (let i = 0; i < n; i++) { const t = performance.now(); await model.run(tensor); infer.push(performance.now() - t); }
    for (let i = 0; i < steps; i++) {
      const t = performance.now();
      const decoded = await decodeBlob(blob, side);
      const s = await screen(decoded, model, "bench", { encounterId: null, eye: null }, null, performance.now() - t);
      step.push(performance.now() - t);
      stages.push(s.result.latency_ms);
    }
    return { infer, step, stages, outcome: parts.decision?.outcome ?? "ungradable", info: model.info };
  },
  canonicalJson,
};

declare global { interface Window { retinaedgeCheck: typeof api } }
window.retinaedgeCheck = api;
document.getElementById("status")!.textContent = "ready";
export type { Manifest };
