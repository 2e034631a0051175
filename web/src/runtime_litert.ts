// LiteRT.js (XNNPack kernels in WebAssembly with relaxed SIMD and threads) for TFLite artifacts. Only its threaded
// build is shipped: it needs a cross-origin isolated page (the server sends COOP/COEP) and relaxed SIMD; where
// either is missing the app falls back to the next artifact in runtime.PREFERENCE (ONNX Runtime Web).
import { CompiledModel, loadAndCompile, loadLiteRt, Tensor } from "@litertjs/core";
import type { Manifest } from "./contract";
import { Backend, Outputs, outputsByShape, registerBackend, RuntimeInfo } from "./runtime";

let loading: Promise<unknown> | null = null;

class LiteRtBackend implements Backend {
  private readonly shape: number[];

  constructor(private readonly model: CompiledModel, manifest: Manifest, private readonly index: Record<string, number>,
              readonly info: RuntimeInfo) {
    const s = manifest.preprocess.input_size;
    this.shape = manifest.preprocess.layout === "NCHW" ? [1, 3, s, s] : [1, s, s, 3];
  }

  async run(tensor: Float32Array): Promise<Outputs> {
    const input = new Tensor(tensor, this.shape);
    let out: Tensor[] = [];
    try {
      out = await this.model.run([input]);
      // toTypedArray copies out of the WASM heap: the tensors can be freed at once.
      const data = (name: string) => (name in this.index ? out[this.index[name]].toTypedArray() as Float32Array : null);
      const logits = data("logits")!, dme = data("dme_logit");
      return { logits: Float32Array.from(logits), cam: data("cam"), dmeLogit: dme ? dme[0] : null, dmeCam: data("dme_cam") };
    } finally {
      input.delete();
      for (const t of out) t.delete();
    }
  }
}

registerBackend("tflite", {
  runtime: "litert.js",
  unavailable: () => (self.crossOriginIsolated ? null
    : "the page is not cross-origin isolated (COOP/COEP), which LiteRT.js's threaded build needs"),
  async open(bytes, manifest, threads) {
    // An absolute path: a relative one would resolve against the bundled module's folder.
    loading ??= loadLiteRt(new URL("litert/", location.href.replace(/[^/]*$/, "")).pathname, { threads: true });
    await loading;
    const model = await loadAndCompile(bytes, { accelerator: "wasm", cpuOptions: { numThreads: threads } });
    const index = outputsByShape(model.getOutputDetails().map((d) => Array.from(d.shape)), manifest);
    const dtype = model.getInputDetails()[0]?.dtype;
    if (dtype !== "float32") throw new Error(`the model's input is ${dtype}; LiteRT.js takes a float32 input (export the TFLite INT8 with float I/O)`);
    const info = { backend: "litert.js", provider: `xnnpack-wasm-relaxed-simd-${threads}t/tflite-${manifest.quantization.precision}`,
                   threads, simd: true, isolated: self.crossOriginIsolated };
    return new LiteRtBackend(model, manifest, index, info);
  },
});
