// The port of edge_runtime/preprocess.py (field of view, crop, resize, pad, normalise) for the browser.
// Same steps, same order, same integer geometry; the golden fixtures check it against the Python code.
import { crop, image, Image8, pyRound, resizeArea, resizeLinear } from "./image";
import type { PreprocessPolicy } from "./contract";

export const FOV_DETECTION_SIDE = 256;
export const MIN_FOV_FRACTION = 0.05;

export class ImageError extends Error {}
export class NoFundusError extends ImageError {}

export interface FieldOfView {
  x: number; y: number; w: number; h: number;
  center: [number, number];
  radius: number;
  fraction: number;
  mask: Image8; // 0/255 at the detection copy's scale
  maskScale: number;
  small?: Image8; // the photo at the detection copy's scale (when reduced), reused by the quality gate
}

export interface Preprocessed {
  tensor: Float32Array; // 1 x 3 x S x S (NCHW) or 1 x S x S x 3
  resizedRgb: Image8; // S x S x 3 uint8 before normalisation
  cropBox: [number, number, number, number];
  pad: [number, number];
  squareSide: number;
  originalSize: [number, number];
}

/** Normalised model-input coordinates (0-1) -> normalised original-image coordinates (Preprocessed.to_original). */
export function toOriginal(pre: Preprocessed, u: number, v: number): [number, number] {
  const x = u * pre.squareSide - pre.pad[0] + pre.cropBox[0];
  const y = v * pre.squareSide - pre.pad[1] + pre.cropBox[1];
  const clip = (t: number) => Math.min(1, Math.max(0, t));
  return [clip(x / pre.originalSize[0]), clip(y / pre.originalSize[1])];
}

// cv2.erode / cv2.dilate with a k x k rectangle, the image border ignored (OpenCV's default border value): a
// separable running minimum (maximum), rows then columns, by van Herk / Gil-Werman (three comparisons a pixel
// whatever k).
export function morphRect(mask: Image8, k: number, op: "erode" | "dilate"): Image8 {
  const { w, h } = mask;
  const r = k >> 1;
  const tmp = new Uint8Array(w * h), out = new Uint8Array(w * h);
  const run = runningExtreme(Math.max(w, h), r, op === "erode");
  for (let y = 0; y < h; y++) run(mask.data, tmp, y * w, 1, w);
  for (let x = 0; x < w; x++) run(tmp, out, x, w, h);
  return image(w, h, 1, out);
}

/** The extreme over [i - r, i + r] of each of ``n`` values (read from ``src`` at ``start``, ``start + stride``, ...,
 *  written likewise to ``dst``); outside the line counts as neutral. Buffers sized once for lines up to ``maxN``. */
function runningExtreme(maxN: number, r: number, min: boolean) {
  const L = 2 * r + 1, size = maxN + 2 * r + L;
  const buf = new Uint8Array(size), g = new Uint8Array(size), hh = new Uint8Array(size);
  const neutral = min ? 255 : 0;
  return (src: Uint8Array, dst: Uint8Array, start: number, stride: number, n: number): void => {
    const m = n + 2 * r;
    buf.fill(neutral, 0, r);
    for (let i = 0, j = start; i < n; i++, j += stride) buf[r + i] = src[j];
    buf.fill(neutral, r + n, m);
    // prefix (g) and suffix (hh) extremes within blocks of L: the window [i, i + 2r] spans at most two blocks
    for (let b = 0; b < m; b += L) {
      const e = Math.min(m, b + L);
      let x = neutral;
      for (let i = b; i < e; i++) { const v = buf[i]; if (min ? v < x : v > x) x = v; g[i] = x; }
      x = neutral;
      for (let i = e - 1; i >= b; i--) { const v = buf[i]; if (min ? v < x : v > x) x = v; hh[i] = x; }
    }
    for (let i = 0, j = start; i < n; i++, j += stride) {
      const a = hh[i], b = g[i + 2 * r];
      dst[j] = (min ? a < b : a > b) ? a : b;
    }
  };
}

interface Component { area: number; left: number; top: number; right: number; bottom: number }

/** cv2.connectedComponentsWithStats (connectivity 8, or 4): labels numbered in raster order of their first pixel. */
export function connectedComponents(mask: Image8, connectivity: 4 | 8 = 8): { labels: Int32Array; stats: Component[] } {
  const { w, h } = mask;
  const parent: number[] = [0];
  const find = (a: number): number => { while (parent[a] !== a) { parent[a] = parent[parent[a]]; a = parent[a]; } return a; };
  const union = (a: number, b: number): number => {
    const ra = find(a), rb = find(b);
    if (ra === rb) return ra;
    const lo = Math.min(ra, rb);
    parent[ra] = lo; parent[rb] = lo;
    return lo;
  };
  const labels = new Int32Array(w * h);
  const eight = connectivity === 8;
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!mask.data[i]) continue;
      let label = 0;
      // the neighbours already labelled: left, then (8-connected) up-left, up, up-right; (4-connected) up
      const visit = (l: number) => { if (l) label = label ? union(label, l) : find(l); };
      if (x > 0) visit(labels[i - 1]);
      if (y > 0) {
        if (eight && x > 0) visit(labels[i - w - 1]);
        visit(labels[i - w]);
        if (eight && x + 1 < w) visit(labels[i - w + 1]);
      }
      if (!label) { label = parent.length; parent.push(label); }
      labels[i] = label;
    }
  }
  // Provisional labels grow in raster order and unions keep the smaller root, so roots renumber in raster order.
  const final = new Int32Array(parent.length);
  const stats: Component[] = [];
  for (let l = 1; l < parent.length; l++) {
    const root = find(l);
    if (root === l) { final[l] = stats.length + 1; stats.push({ area: 0, left: w, top: h, right: -1, bottom: -1 }); }
  }
  for (let l = 1; l < parent.length; l++) final[l] = final[find(l)];
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!labels[i]) continue;
      const l = final[labels[i]];
      labels[i] = l;
      const s = stats[l - 1];
      s.area++;
      if (x < s.left) s.left = x;
      if (x > s.right) s.right = x;
      if (y < s.top) s.top = y;
      if (y > s.bottom) s.bottom = y;
    }
  }
  return { labels, stats };
}

// _refine_box: each edge of the small copy's box moved to the first/last full-resolution row or column (within
// ``margin``) where >= 2 pixels are brighter than the threshold.
function refineBox(bgr: Image8, x0: number, y0: number, x1: number, y1: number, threshold: number,
                   margin: number): [number, number, number, number] {
  const left = Math.max(0, Math.floor(x0) - margin), top = Math.max(0, Math.floor(y0) - margin);
  const right = Math.min(bgr.w, Math.ceil(x1) + margin), bottom = Math.min(bgr.h, Math.ceil(y1) + margin);
  const bright = (x: number, y: number) => {
    const i = (y * bgr.w + x) * 3;
    return Math.max(bgr.data[i], bgr.data[i + 1], bgr.data[i + 2]) > threshold;
  };
  // Python slices clamp at the array's end; so do these ranges.
  const columns = (xa: number, xb: number, ya: number, yb: number): boolean[] => {
    const flags: boolean[] = [];
    for (let x = Math.max(0, xa); x < Math.min(bgr.w, xb); x++) {
      let n = 0;
      for (let y = Math.max(0, ya); y < Math.min(bgr.h, yb); y++) if (bright(x, y)) n++;
      flags.push(n >= 2);
    }
    return flags;
  };
  const rows = (xa: number, xb: number, ya: number, yb: number): boolean[] => {
    const flags: boolean[] = [];
    for (let y = Math.max(0, ya); y < Math.min(bgr.h, yb); y++) {
      let n = 0;
      for (let x = Math.max(0, xa); x < Math.min(bgr.w, xb); x++) if (bright(x, y)) n++;
      flags.push(n >= 2);
    }
    return flags;
  };
  const first = (flags: boolean[], fallback: number) => { const i = flags.indexOf(true); return i >= 0 ? i : fallback; };
  const last = (flags: boolean[], fallback: number) => { const i = flags.lastIndexOf(true); return i >= 0 ? i + 1 : fallback; };
  const band = 2 * margin;
  // A negative Python slice start counts from the end; right - band and bottom - band are >= 0 here because the
  // boxes are at least the margin wide, as in the Python code.
  const x = left + first(columns(left, left + band, top, bottom), 0);
  const xEnd = right - band + last(columns(right - band, right, top, bottom), band);
  const y = top + first(rows(left, right, top, top + band), 0);
  const yEnd = bottom - band + last(rows(left, right, bottom - band, bottom), band);
  return [x, y, Math.max(1, xEnd - x), Math.max(1, yEnd - y)];
}

/** detect_fov: the largest bright connected region, found on a copy with longer side FOV_DETECTION_SIDE. */
export function detectFov(bgr: Image8, threshold = 12): FieldOfView {
  const scale = Math.min(1, FOV_DETECTION_SIDE / Math.max(bgr.w, bgr.h));
  const small = scale < 1
    ? resizeArea(bgr, Math.max(1, pyRound(bgr.w * scale)), Math.max(1, pyRound(bgr.h * scale))) : bgr;
  const n = small.w * small.h;
  const raw = image(small.w, small.h, 1);
  for (let i = 0; i < n; i++) {
    const m = Math.max(small.data[3 * i], small.data[3 * i + 1], small.data[3 * i + 2]);
    raw.data[i] = m > threshold ? 255 : 0;
  }
  let mask = morphRect(morphRect(raw, 5, "erode"), 5, "dilate");
  const { labels, stats } = connectedComponents(mask);
  if (stats.length === 0) {
    throw new NoFundusError("no fundus field of view found (the image is dark everywhere); check the camera and re-capture");
  }
  let biggest = 0;
  for (let i = 1; i < stats.length; i++) if (stats[i].area > stats[biggest].area) biggest = i;
  const s = stats[biggest];
  const fraction = s.area / n;
  if (fraction < MIN_FOV_FRACTION) {
    throw new NoFundusError(`the bright region covers only ${(fraction * 100).toFixed(1)}% of the image (need >= 5%); no fundus to grade`);
  }
  if (stats.length > 1) {
    const only = image(small.w, small.h, 1);
    for (let i = 0; i < n; i++) only.data[i] = labels[i] === biggest + 1 ? 255 : 0;
    mask = only;
  }
  const sw = s.right - s.left + 1, sh = s.bottom - s.top + 1;
  const [x, y, w, h] = refineBox(bgr, s.left / scale, s.top / scale, (s.left + sw) / scale, (s.top + sh) / scale,
                                 threshold, Math.ceil(1 / scale) + 1);
  const radius = Math.max(w, h) / 2;
  return { x, y, w, h, center: [x + w / 2, y + h / 2], radius, fraction, mask, maskScale: scale, small };
}

/** crop_and_resize: crop to the field of view, resize (area when shrinking), pad to a black square, as RGB. */
export function cropAndResize(bgr: Image8, policy: PreprocessPolicy, fov?: FieldOfView):
    { rgb: Image8; cropBox: [number, number, number, number]; pad: [number, number]; side: number } {
  if (policy.ben_graham) throw new ImageError("Ben Graham preprocessing is not implemented in the web app; export without it");
  let x = 0, y = 0, w = bgr.w, h = bgr.h;
  if (policy.crop_to_fundus) {
    const f = fov ?? detectFov(bgr, policy.fov_threshold);
    ({ x, y, w, h } = f);
  }
  const side = Math.max(w, h);
  const left = Math.floor((side - w) / 2), top = Math.floor((side - h) / 2);
  const size = policy.input_size;
  const scale = size / side;
  const cLeft = Math.trunc(pyRound(left * scale)), cTop = Math.trunc(pyRound(top * scale));
  const cW = Math.max(1, Math.min(size - cLeft, Math.trunc(pyRound(w * scale))));
  const cH = Math.max(1, Math.min(size - cTop, Math.trunc(pyRound(h * scale))));
  const region = crop(bgr, x, y, w, h);
  const content = side > size ? resizeArea(region, cW, cH) : resizeLinear(region, cW, cH);
  const out = image(size, size, 3); // always RGB, as crop_and_resize returns it; normalize() reorders for BGR models
  for (let r = 0; r < cH; r++) {
    for (let col = 0; col < cW; col++) {
      const s = (r * cW + col) * 3, d = ((r + cTop) * size + col + cLeft) * 3;
      out.data[d] = content.data[s + 2]; out.data[d + 1] = content.data[s + 1]; out.data[d + 2] = content.data[s];
    }
  }
  return { rgb: out, cropBox: [x, y, w, h], pad: [left, top], side };
}

/** normalize: uint8 RGB -> float32 (x * 1/(255 std) - mean/std), in float32 arithmetic as numpy does it. */
export function normalize(rgb: Image8, policy: PreprocessPolicy): Float32Array {
  const size = rgb.w * rgb.h;
  const scale = policy.std.map((s) => Math.fround(1 / Math.fround(255 * Math.fround(s))));
  const offset = policy.mean.map((m, c) => Math.fround(-Math.fround(m) / Math.fround(policy.std[c])));
  const out = new Float32Array(size * 3);
  // Input channel k of the model reads photo channel src[k]: RGB keeps the order, BGR reverses it.
  const src = policy.color_order === "BGR" ? [2, 1, 0] : [0, 1, 2];
  for (let k = 0; k < 3; k++) {
    const ch = src[k], sc = scale[ch], off = offset[ch];
    for (let i = 0; i < size; i++) {
      const v = Math.fround(Math.fround(rgb.data[3 * i + ch] * sc) + off);
      if (policy.layout === "NCHW") out[k * size + i] = v; else out[3 * i + k] = v;
    }
  }
  return out;
}

export function preprocess(bgr: Image8, policy: PreprocessPolicy, fov?: FieldOfView): Preprocessed {
  const { rgb, cropBox, pad, side } = cropAndResize(bgr, policy, fov);
  return { tensor: normalize(rgb, policy), resizedRgb: rgb, cropBox, pad, squareSide: side, originalSize: [bgr.w, bgr.h] };
}
