// ONNX Runtime Web (WASM backend: SIMD, and threads when the page is cross-origin isolated). Why ORT-web and not
// LiteRT.js: the project's gated INT8 artifacts are ONNX (QDQ) and LiteRT.js refuses int8-I/O TFLite files; the
// same ONNX file then runs natively (edge_runtime) and here. benchmarks/browser_speed.py measures both runtimes.
import * as ort from "onnxruntime-web/wasm";
import type { Manifest } from "./contract";

export interface Outputs { logits: Float32Array; cam: Float32Array | null; dmeLogit: number | null; dmeCam: Float32Array | null }

export interface RuntimeInfo { backend: string; provider: string; threads: number; simd: boolean; isolated: boolean }

let configured = false;

function configure(): void {
  if (configured) return;
  configured = true;
  // An absolute path: a relative one would resolve against the bundled module's folder.
  ort.env.wasm.wasmPaths = new URL("ort/", location.href.replace(/[^/]*$/, "")).pathname;
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  ort.env.wasm.simd = true;
  ort.env.wasm.proxy = false;
}

export class ModelSession {
  private constructor(readonly session: ort.InferenceSession, readonly manifest: Manifest, readonly info: RuntimeInfo) {}

  static async open(bytes: Uint8Array, manifest: Manifest, threads?: number): Promise<ModelSession> {
    configure();
    if (threads) ort.env.wasm.numThreads = threads;
    const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    const info = { backend: "onnxruntime-web", provider: "wasm", threads: Number(ort.env.wasm.numThreads),
                   simd: true, isolated: self.crossOriginIsolated };
    return new ModelSession(session, manifest, info);
  }

  async run(tensor: Float32Array): Promise<Outputs> {
    const s = this.manifest.preprocess.input_size;
    const dims = this.manifest.preprocess.layout === "NCHW" ? [1, 3, s, s] : [1, s, s, 3];
    const feeds = { [this.session.inputNames[0]]: new ort.Tensor("float32", tensor, dims) };
    const out = await this.session.run(feeds);
    const named = (name: string) => (out[name]?.data as Float32Array | undefined) ?? null;
    const [logitsName, camName, dmeName, dmeCamName] = this.manifest.output_names;
    const logits = named(logitsName);
    if (!logits) throw new Error(`the model has no '${logitsName}' output`);
    const dme = dmeName ? named(dmeName) : null;
    return { logits, cam: named(camName), dmeLogit: dme ? dme[0] : null, dmeCam: dmeCamName ? named(dmeCamName) : null };
  }
}
