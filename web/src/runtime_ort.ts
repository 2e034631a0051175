// ONNX Runtime Web (WASM backend: SIMD, and threads when the page is cross-origin isolated) for ONNX artifacts.
import * as ort from "onnxruntime-web/wasm";
import type { Manifest } from "./contract";
import { Backend, Outputs, registerBackend, RuntimeInfo } from "./runtime";

let configured = false;

function configure(threads: number): void {
  if (!configured) {
    // An absolute path: a relative one would resolve against the bundled module's folder.
    ort.env.wasm.wasmPaths = new URL("ort/", location.href.replace(/[^/]*$/, "")).pathname;
    ort.env.wasm.simd = true;
    ort.env.wasm.proxy = false;
    configured = true;
  }
  ort.env.wasm.numThreads = threads; // read when the WASM module starts (the first session): later values are ignored
}

class OrtBackend implements Backend {
  constructor(private readonly session: ort.InferenceSession, private readonly manifest: Manifest, readonly info: RuntimeInfo) {}

  async run(tensor: Float32Array): Promise<Outputs> {
    const s = this.manifest.preprocess.input_size;
    const dims = this.manifest.preprocess.layout === "NCHW" ? [1, 3, s, s] : [1, s, s, 3];
    const out = await this.session.run({ [this.session.inputNames[0]]: new ort.Tensor("float32", tensor, dims) });
    const named = (name: string | undefined) => (name ? (out[name]?.data as Float32Array | undefined) ?? null : null);
    const [logitsName, camName, dmeName, dmeCamName] = this.manifest.output_names;
    const logits = named(logitsName);
    if (!logits) throw new Error(`the model has no '${logitsName}' output`);
    const dme = named(dmeName);
    return { logits, cam: named(camName), dmeLogit: dme ? dme[0] : null, dmeCam: named(dmeCamName) };
  }
}

registerBackend("onnx", {
  runtime: "onnxruntime-web",
  unavailable: () => (typeof WebAssembly === "object" ? null : "no WebAssembly"),
  async open(bytes, manifest, threads) {
    configure(threads);
    const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"], graphOptimizationLevel: "all" });
    const n = Number(ort.env.wasm.numThreads);
    const info = { backend: "onnxruntime-web", provider: `wasm-simd-${n}t/onnx-${manifest.quantization.precision}`,
                   threads: n, simd: true, isolated: self.crossOriginIsolated };
    return new OrtBackend(session, manifest, info);
  },
});
