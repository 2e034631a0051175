// LiteRT.js (XNNPack in WASM, threads) timing page for benchmarks/browser_speed.py --litert: not part of the app.
// The benchmark installs @litertjs/core outside the app's lockfile, bundles this page into web/dist/bench/ for
// the run (same origin, cross-origin isolated) and removes it afterwards.
import { loadAndCompile, loadLiteRt, Tensor } from "@litertjs/core";

const fromB64 = (s: string): Uint8Array => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));

async function time(modelB64: string, shape: number[], n: number): Promise<Record<string, unknown>> {
  await loadLiteRt(new URL("litert-wasm/", location.href).pathname, { threads: true });
  const model = await loadAndCompile(fromB64(modelB64), { accelerator: "wasm" });
  const input = new Float32Array(shape.reduce((a, b) => a * b, 1)).map((_, i) => Math.sin(i));
  const run = async () => {
    const tensor = new Tensor(input, shape);
    const out = await model.run(tensor);
    tensor.delete();
    for (const t of out) t.delete();
  };
  for (let i = 0; i < 3; i++) await run();
  const ms: number[] = [];
  for (let i = 0; i < n; i++) { const t = performance.now(); await run(); ms.push(performance.now() - t); }
  ms.sort((a, b) => a - b);
  return { infer_ms: ms[Math.floor(n / 2)], isolated: self.crossOriginIsolated };
}

(window as unknown as { litertCheck: unknown }).litertCheck = { time };
document.getElementById("status")!.textContent = "ready";
