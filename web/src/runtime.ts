// The in-browser runtimes behind one interface, keyed by the artifact format they run, and the table the app
// chooses an artifact by. Each backend is its own module (runtime_ort.ts, runtime_litert.ts) that registers
// itself here; a screening result records which backend and provider produced it.
import { CONTRACT, Manifest } from "./contract";

export interface Outputs { logits: Float32Array; cam: Float32Array | null; dmeLogit: number | null; dmeCam: Float32Array | null }

export interface RuntimeInfo {
  backend: string; // the runtime ("litert.js", "onnxruntime-web"), as ScreeningResult.backend records it
  provider: string; // kernels, threads and artifact, as ScreeningResult.provider records it
  threads: number;
  simd: boolean;
  isolated: boolean;
  probeMs?: number; // p50 of the probe's inferences when the app opened the model
}

export interface Backend { readonly info: RuntimeInfo; run(tensor: Float32Array): Promise<Outputs> }

export interface BackendSpec {
  runtime: string;
  /** Why this device cannot run it, or null when it can. */
  unavailable(): string | null;
  open(bytes: Uint8Array, manifest: Manifest, threads: number): Promise<Backend>;
}

export class BackendUnavailableError extends Error {}

const BACKENDS: Record<string, BackendSpec> = {};

/** One runtime per artifact format (the manifest's ``format``). */
export function registerBackend(format: string, spec: BackendSpec): void {
  if (BACKENDS[format]) throw new Error(`a backend for ${format} is already registered`);
  BACKENDS[format] = spec;
}

export function backendFor(format: string): BackendSpec {
  const spec = BACKENDS[format];
  if (!spec) throw new BackendUnavailableError(`this app runs ${Object.keys(BACKENDS).join(", ")} artifacts, not ${format}`);
  return spec;
}

/** The artifacts the app uses, fastest first: measured by benchmarks/browser_speed.py (headless Chromium, WASM,
 *  2 threads, the 224-px Lite0 student; docs/studies/2026-12-07_browser_speed.md). LiteRT.js (XNNPack, relaxed
 *  SIMD) ran the INT8 TFLite 2.0x faster than the FP32 one and 3.5x faster than ONNX Runtime Web ran the FP32 ONNX;
 *  ORT-web's INT8 (QDQ) kernels are slower than its FP32 ones in WASM, so ONNX INT8 comes last. The app takes the first row the server offers as a signed,
 *  gated release and this device can run; a row that fails to open is skipped and the next is tried. */
export const PREFERENCE: readonly { format: string; precision: string }[] = [
  { format: "tflite", precision: "int8" },
  { format: "tflite", precision: "fp32" },
  { format: "onnx", precision: "fp32" },
  { format: "onnx", precision: "int8" },
];

export function preferenceRank(manifest: Pick<Manifest, "format" | "quantization">): number {
  const rank = PREFERENCE.findIndex((p) => p.format === manifest.format && p.precision === manifest.quantization?.precision);
  return rank < 0 ? PREFERENCE.length : rank;
}

export const defaultThreads = (): number =>
  self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

/** Which output of a runtime that keeps no output names is which head's logits or CAM: per head in the manifest,
 *  the logits are rank 2 and the CAM rank 4, both with the head's class count on axis 1 (as edge_runtime's LiteRT
 *  backend tells them apart). */
export function outputsByShape(shapes: ArrayLike<number>[], manifest: Manifest): Record<string, number> {
  const found: Record<string, number> = {};
  for (const head of manifest.heads ?? ["grade"]) {
    const spec = CONTRACT.heads[head];
    if (!spec) throw new Error(`the manifest names head '${head}', which this app does not know`);
    spec.outputs.forEach((name, k) => {
      const rank = k === 0 ? 2 : 4;
      const i = shapes.findIndex((s) => s.length === rank && s[1] === spec.classes);
      if (i < 0) throw new Error(`the model has no rank-${rank} output with ${spec.classes} classes for '${name}'`);
      found[name] = i;
    });
  }
  return found;
}

export class ModelSession {
  private constructor(private readonly backend: Backend, readonly manifest: Manifest) {}

  get info(): RuntimeInfo { return this.backend.info; }

  /** Open with the backend registered for the manifest's format; ``probe`` times a few inferences on a constant
   *  input and refuses a model whose outputs are not finite (a runtime that loads but computes garbage). */
  static async open(bytes: Uint8Array, manifest: Manifest, options: { threads?: number; probe?: number } = {}): Promise<ModelSession> {
    const spec = backendFor(manifest.format);
    const why = spec.unavailable();
    if (why) throw new BackendUnavailableError(`${spec.runtime} cannot run here: ${why}`);
    const session = new ModelSession(await spec.open(bytes, manifest, options.threads ?? defaultThreads()), manifest);
    if (options.probe) await session.probe(options.probe);
    return session;
  }

  run(tensor: Float32Array): Promise<Outputs> { return this.backend.run(tensor); }

  private async probe(n: number): Promise<void> {
    const s = this.manifest.preprocess.input_size;
    const tensor = new Float32Array(3 * s * s).fill(0.1);
    const first = await this.run(tensor);
    if (!first.logits.every(Number.isFinite)) throw new Error(`${this.info.backend} gave non-finite logits`);
    const ms: number[] = [];
    for (let i = 0; i < n; i++) { const t = performance.now(); await this.run(tensor); ms.push(performance.now() - t); }
    ms.sort((a, b) => a - b);
    this.backend.info.probeMs = Math.round(ms[Math.floor(n / 2)] * 10) / 10;
  }
}
