// Builds web/dist: the app and its service worker bundled by esbuild, the static files, and only the runtime files
// the app loads (ONNX Runtime Web's WASM SIMD + threads build, LiteRT.js's threaded build). Deterministic: same
// sources, same bytes.
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { gzipSync } from "node:zlib";
import * as esbuild from "esbuild";

const here = new URL(".", import.meta.url).pathname;
const src = join(here, "src"), dist = join(here, "dist");
const ortDist = join(here, "node_modules", "onnxruntime-web", "dist");
const ORT_FILES = ["ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"];
// LiteRT.js: only its threaded build (relaxed SIMD + threads); the app falls back to ONNX Runtime where it cannot run.
const litertDist = join(here, "node_modules", "@litertjs", "core", "wasm");
const LITERT_FILES = ["litert_wasm_threaded_internal.js", "litert_wasm_threaded_internal.wasm"];
const STATIC = ["index.html", "app.css", "manifest.webmanifest", "icon.svg", "check.html"];

rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, "ort"), { recursive: true });
mkdirSync(join(dist, "litert"), { recursive: true });
const common = {
  bundle: true, minify: true, format: "esm", target: ["chrome110", "safari16", "firefox115"], legalComments: "none",
  // The build of onnxruntime-web that loads its .mjs/.wasm from ort.env.wasm.wasmPaths (served from dist/ort/).
  conditions: ["onnxruntime-web-use-extern-wasm"], logLevel: "warning",
};
await esbuild.build({ ...common, entryPoints: { app: join(src, "main.ts"), check: join(src, "check.ts"), quality_worker: join(src, "quality_worker.ts") }, outdir: dist });
for (const f of STATIC) copyFileSync(join(src, f), join(dist, f));
for (const f of ORT_FILES) copyFileSync(join(ortDist, f), join(dist, "ort", f));
for (const f of LITERT_FILES) copyFileSync(join(litertDist, f), join(dist, "litert", f));

const walk = (dir, prefix = "") => readdirSync(dir).sort().flatMap((name) => {
  const path = join(dir, name);
  return statSync(path).isDirectory() ? walk(path, `${prefix}${name}/`) : [`${prefix}${name}`];
});
const shell = walk(dist).filter((f) => !f.startsWith("check."));  // the check page is for tests and benchmarks
const version = createHash("sha256");
for (const f of shell) version.update(f).update(readFileSync(join(dist, f)));
await esbuild.build({
  ...common, entryPoints: { sw: join(src, "sw.ts") }, outdir: dist,
  define: { __PRECACHE__: JSON.stringify(["./", ...shell.filter((f) => f !== "index.html")]), __VERSION__: JSON.stringify(version.digest("hex").slice(0, 16)) },
});
// Pre-compressed copies: the server sends them to browsers that accept gzip (first-load bytes).
let raw = 0, sent = 0;
for (const f of walk(dist)) {
  const data = readFileSync(join(dist, f));
  const gz = gzipSync(data, { level: 9 });
  raw += data.length;
  if (gz.length < data.length * 0.9) { writeFileSync(join(dist, `${f}.gz`), gz); sent += gz.length; } else sent += data.length;
}
console.log(`web/dist: ${walk(dist).length} files, ${(raw / 1e6).toFixed(2)} MB (${(sent / 1e6).toFixed(2)} MB gzip)`);
