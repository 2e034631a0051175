// One screening step, as edge_runtime.screen.Screener._screen does it: decode -> field of view -> quality gate ->
// preprocess -> infer -> decide -> CAM -> outbox (committed) -> shown. An ungradable photo is stored too.
// The gate runs in a worker (quality_worker.ts) while this thread preprocesses, infers and renders the CAM; an
// ungradable verdict then discards what those made, so the outcome is the sequential step's.
import { bgrFromRgba, Image8, reduceRgbaToBgr } from "./image";
import { CONTRACT, PreprocessPolicy } from "./contract";
import { decide, Decision } from "./decision";
import { detectFov, FieldOfView, ImageError, preprocess, Preprocessed, toOriginal } from "./preprocess";
import { assess } from "./quality";
import type { QualityRequest } from "./quality_worker";
import { canonicalJson, contentHash, newResult, QualityReport, ScreeningResult } from "./result";
import { renderOverlay } from "./overlay";
import type { ModelSession } from "./runtime";
import * as outbox from "./outbox";

export const MAX_IMAGE_BYTES = 40 * 1024 * 1024;
export const MAX_IMAGE_PIXELS = 50_000_000;

export interface Visit { encounterId: string | null; eye: "left" | "right" | null }

export interface Screening { result: ScreeningResult; overlay: Blob | null; decision: Decision | null }

/** decode_side: the shorter side a photo is decoded at: 1.5x the model input, and at least the quality gate's
 *  GATE_SIDE (edge_runtime.screen). */
export function decodeSide(policy: PreprocessPolicy): number {
  return Math.max(Math.ceil(1.5 * policy.input_size), CONTRACT.quality.gate_side);
}

/** jpeg_reduction: the largest of 8, 4, 2 that keeps the shorter side >= ``minSide`` (1 when none does). */
export function jpegReduction(w: number, h: number, minSide: number | null): number {
  if (!minSide) return 1;
  return [8, 4, 2].find((k) => Math.floor(Math.min(w, h) / k) >= minSide) ?? 1;
}

/** Decode a photo file (JPEG/PNG/WebP) to 8-bit BGR with EXIF orientation and no colour management. A large JPEG
 *  is then reduced as the Screener's libjpeg decode reduces it (1/2, 1/4 or 1/8 to ceil(size / k)), by block means
 *  here (image.reduceRgbaToBgr: browsers cannot decode at reduced scale), so the gate and the model see the
 *  Screener's scale. */
export async function decodeBlob(blob: Blob, minSide: number | null = null): Promise<Image8> {
  if (blob.size === 0) throw new ImageError("image is empty (0 bytes); re-capture or check the file");
  if (blob.size > MAX_IMAGE_BYTES) throw new ImageError(`image is ${(blob.size / 1e6).toFixed(1)} MB, over the 40 MB limit`);
  let bitmap: ImageBitmap;
  try {
    bitmap = await createImageBitmap(blob, { colorSpaceConversion: "none", imageOrientation: "from-image", premultiplyAlpha: "none" });
  } catch {
    throw new ImageError("the file is not a decodable image; expected JPEG, PNG or WebP");
  }
  const head = new Uint8Array(await blob.slice(0, 2).arrayBuffer());
  const k = head[0] === 0xff && head[1] === 0xd8 ? jpegReduction(bitmap.width, bitmap.height, minSide) : 1;
  const { rgba, width, height } = readPixels(bitmap);
  bitmap.close();
  return k > 1 ? reduceRgbaToBgr(rgba, width, height, k) : bgrFromRgba(rgba, width, height); // a JPEG is opaque
}

function readPixels(source: ImageBitmap | HTMLVideoElement | HTMLCanvasElement, w?: number, h?: number) {
  const width = w ?? (source as ImageBitmap).width, height = h ?? (source as ImageBitmap).height;
  if (width * height > MAX_IMAGE_PIXELS) throw new ImageError(`image is ${width}x${height}, over the 50 MP limit`);
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true, colorSpace: "srgb" })!;
  ctx.drawImage(source, 0, 0, width, height);
  return { rgba: ctx.getImageData(0, 0, width, height).data, width, height };
}

export function bitmapToBgr(source: ImageBitmap | HTMLVideoElement | HTMLCanvasElement, w?: number, h?: number): Image8 {
  const { rgba, width, height } = readPixels(source, w, h);
  return bgrFromRgba(rgba, width, height);
}

class Clock {
  readonly timings: Record<string, number> = {};
  private last = performance.now();
  lap(stage: string): void {
    const now = performance.now();
    this.timings[stage] = Math.round((now - this.last) * 1000) / 1000;
    this.last = now;
  }
}

export interface StepParts { fov: FieldOfView | null; quality: QualityReport; pre: Preprocessed | null; logits: Float32Array | null; decision: Decision | null; overlay: Blob | null }

type Pending = { resolve: (r: { report: QualityReport; ms: number }) => void; reject: (e: Error) => void };
let worker: Worker | null | undefined;
const pending = new Map<number, Pending>();
let nextId = 0;

function qualityWorker(): Worker | null {
  if (worker !== undefined) return worker;
  try {
    worker = new Worker(new URL("quality_worker.js", location.href.replace(/[^/]*$/, "")), { type: "module" });
    worker.onmessage = (event: MessageEvent<{ id: number; report?: QualityReport; ms?: number; error?: string }>) => {
      const { id, report, ms, error } = event.data;
      const waiting = pending.get(id);
      pending.delete(id);
      if (error || !report) waiting?.reject(new Error(`quality gate: ${error}`)); else waiting?.resolve({ report, ms: ms ?? 0 });
    };
    worker.onerror = () => { // a worker that cannot start: this and later steps assess on this thread
      for (const waiting of pending.values()) waiting.reject(new Error("the quality worker failed to start"));
      pending.clear();
      worker = null;
    };
  } catch {
    worker = null;
  }
  return worker;
}

/** The gate's verdict, from the worker when there is one (the photo is copied to it), else computed here. */
async function assessAside(bgr: Image8, fov: FieldOfView | null): Promise<{ report: QualityReport; ms: number }> {
  const w = qualityWorker();
  if (w) {
    const id = nextId++;
    const message: QualityRequest = { id, bgr, fov };
    try {
      return await new Promise((resolve, reject) => { pending.set(id, { resolve, reject }); w.postMessage(message); });
    } catch (err) {
      if (worker !== null) throw err; // the worker ran and failed: a bug to show, not to hide
    }
  }
  const started = performance.now();
  return { report: assess(bgr, fov), ms: performance.now() - started };
}

/** The pure part of the step (no storage): what the golden fixtures compare with Python. ``render``: also the
 *  CAM overlay (while the gate runs). */
export async function analyse(bgr: Image8, session: ModelSession, clock = new Clock(), render = false): Promise<StepParts> {
  const policy = session.manifest.preprocess;
  let fov: FieldOfView | null = null;
  try { fov = detectFov(bgr, policy.fov_threshold); } catch (err) { if (!(err instanceof ImageError)) throw err; }
  clock.lap("fov");
  const gate = assessAside(bgr, fov);
  gate.catch(() => undefined); // awaited below; not an unhandled rejection meanwhile
  let pre: Preprocessed | null = null, refused: ImageError | null = null;
  let out: Awaited<ReturnType<ModelSession["run"]>> | null = null, decision: Decision | null = null;
  let overlay: Blob | null = null;
  // Speculative: the gate decides below whether any of this is used.
  try {
    pre = preprocess(bgr, policy, fov ?? undefined);
  } catch (err) {
    if (!(err instanceof ImageError)) throw err;
    refused = err;
  }
  clock.lap("preprocess");
  if (pre) {
    out = await session.run(pre.tensor);
    clock.lap("infer");
    const m = session.manifest;
    decision = decide(out.logits, out.cam, m.cam_shape, m.operating_point, m.dme_operating_point ? out.dmeLogit : null,
                      out.dmeCam, m.dme_operating_point);
    clock.lap("decide");
    if (render) {
      overlay = await renderOverlay(bgr, decision.cam, pre).convertToBlob({ type: "image/png" });
      clock.lap("overlay");
    }
  }
  let { report: quality, ms } = await gate;
  clock.lap("quality_wait");
  clock.timings.quality = Math.round(ms * 1000) / 1000;
  if (!quality.gradable) return { fov, quality, pre: null, logits: null, decision: null, overlay: null };
  if (refused || !pre || !out) {
    quality = { ...quality, gradable: false, score: 0, reasons: [...quality.reasons, refused?.message ?? "not preprocessed"] };
    return { fov, quality, pre: null, logits: null, decision: null, overlay: null };
  }
  return { fov, quality, pre, logits: out.logits, decision, overlay };
}

/** Screen one decoded photo and commit the result to the outbox before returning it. */
export async function screen(bgr: Image8, session: ModelSession, deviceId: string, visit: Visit,
                             imageName: string | null, decodeMs: number): Promise<Screening> {
  const clock = new Clock();
  const started = performance.now();
  clock.timings.decode = decodeMs;
  const parts = await analyse(bgr, session, clock, true);
  const m = session.manifest;
  const common = {
    device_id: deviceId, model_version: m.model_version, model_sha256: m.sha256 ?? "", backend: session.info.backend,
    provider: `${session.info.provider}${session.info.simd ? "-simd" : ""}-${session.info.threads}t`,
    image_name: imageName, encounter_id: visit.encounterId, eye: visit.eye,
  };
  let result: ScreeningResult;
  const overlay = parts.overlay;
  const d = parts.decision;
  if (!d || !parts.pre) {
    result = newResult({ ...common, quality: parts.quality, grade: null, probabilities: null, confidence: null,
                         referable: null, outcome: "ungradable", referable_probability: null, threshold: null,
                         cam_peak: null, latency_ms: { ...clock.timings } });
  } else {
    const camPeak = d.camPeak ? toOriginal(parts.pre, ...d.camPeak) : null;
    const dme = d.dme ? { dme_probability: d.dme.probability, dme_present: d.dme.present, dme_threshold: d.dme.threshold,
                          dme_cam_peak: d.dme.camPeak ? toOriginal(parts.pre, ...d.dme.camPeak) : null } : {};
    result = newResult({ ...common, quality: parts.quality, grade: d.grade, probabilities: d.probabilities,
                         confidence: d.confidence, referable: d.referable, outcome: d.outcome,
                         referable_probability: d.referableProbability, threshold: d.threshold, cam_peak: camPeak,
                         ...dme, latency_ms: { ...clock.timings } });
  }
  const canonical = canonicalJson(result);
  await outbox.put({ result_id: result.result_id, created_at: Date.now(), state: "pending", result, canonical,
                     content_hash: await contentHash(canonical), overlay_png: overlay, attempts: 0, last_error: null });
  clock.lap("store");
  clock.timings.total = Math.round((decodeMs + performance.now() - started) * 1000) / 1000;
  return { result: { ...result, latency_ms: { ...clock.timings } }, overlay, decision: d };
}
