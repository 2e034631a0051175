// The port of edge_runtime/quality.py's indicators. The rules, thresholds, reasons and advice are not ported:
// they are read from Python (contract.generated.json), so only the measurements are written twice, and the
// golden fixtures bind every metric and every verdict to the Python gate.
import { CONTRACT } from "./contract";
import { crop, image, Image8, pyRound, resizeArea, resizeLinear, resizeNearest, sat8 } from "./image";
import { connectedComponents, detectFov, FieldOfView, ImageError, morphRect } from "./preprocess";
import { sigmoid } from "./decision";
import type { QualityReport } from "./result";

const Q = CONTRACT.quality;
const WORK_SIZE = Q.work_size;
const PATCH_SCALE = 4;
const PATCH_DIAMETER = 0.2;
const DARK_PATCH_DIAMETER = 0.1;
const BLOCK_PERIODS = [4, 8];
const BLOCK_RIM = 0.03;
// A flat dark-grey surround (surround_level / surround_fov in edge_runtime/quality.py, same constants).
const SURROUND_CORNER = 0.04;
const SURROUND_SPREAD = 6;
const MAX_SURROUND_LEVEL = 48;
const FOV_THRESHOLD = 12;

// ---- OpenCV primitives the gate uses (8-bit, single channel unless said) ----

/** cv2.getStructuringElement(MORPH_ELLIPSE, (k, k)) as row spans [j1, j2). */
function ellipse(k: number): [number, number][] {
  const r = Math.floor(k / 2), c = Math.floor(k / 2);
  const inv = r ? 1 / (r * r) : 0;
  const rows: [number, number][] = [];
  for (let i = 0; i < k; i++) {
    const dy = i - r;
    if (Math.abs(dy) > r) { rows.push([0, 0]); continue; }
    const dx = pyRound(c * Math.sqrt((r * r - dy * dy) * inv));
    rows.push([Math.max(c - dx, 0), Math.min(c + dx + 1, k)]);
  }
  return rows;
}

/** cv2.erode / cv2.dilate with an elliptical element, the image border ignored (a dilation is the erosion of the
 *  inverted image); ``zeroBorder``: the outside counts as 0 (quality._erode's BORDER_CONSTANT 0). */
function morphEllipse(src: Image8, k: number, op: "erode" | "dilate", zeroBorder = false): Image8 {
  const spans = ellipse(k), r = Math.floor(k / 2);
  const { w, h } = src;
  const inv = op === "dilate";
  let data = src.data;
  if (inv) { data = new Uint8Array(src.data.length); for (let i = 0; i < data.length; i++) data[i] = 255 - src.data[i]; }
  const out = new Uint8Array(w * h).fill(255);
  const rowMin = new Uint8Array(w * h);
  let lastSpan = "";
  for (let i = 0; i < k; i++) {
    const [j1, j2] = spans[i];
    if (j2 <= j1) continue;
    const span = `${j1},${j2}`;
    if (span !== lastSpan) computeRowMin(j1, j2); // consecutive element rows often share a span
    lastSpan = span;
    const dy = i - r;
    const y0 = Math.max(0, -dy), y1 = Math.min(h, h - dy);
    if (zeroBorder) { // rows of the element that fall outside the image see the zero border
      for (let y = 0; y < h; y++) if (y < y0 || y >= y1) out.fill(0, y * w, (y + 1) * w);
    }
    for (let y = y0; y < y1; y++) {
      const o = y * w, s = (y + dy) * w;
      for (let x = 0; x < w; x++) if (rowMin[s + x] < out[o + x]) out[o + x] = rowMin[s + x];
    }
  }
  if (inv) for (let i = 0; i < out.length; i++) out[i] = 255 - out[i];
  return image(w, h, 1, out);

  // The minimum over [x + j1 - r, x + j2 - r) for every x of every row, by van Herk / Gil-Werman (block prefix and
  // suffix minima: three comparisons a pixel whatever the span); outside the row counts as 255, or 0 (zeroBorder).
  function computeRowMin(j1: number, j2: number): void {
    const L = j2 - j1, a = j1 - r, pad = L + Math.abs(a) + 1;
    const n = w + 2 * pad, fill = zeroBorder ? 0 : 255;
    const buf = new Uint8Array(n), g = new Uint8Array(n), hh = new Uint8Array(n);
    for (let y = 0; y < h; y++) {
      const row = y * w;
      buf.fill(fill, 0, pad);
      buf.set(data.subarray(row, row + w), pad);
      buf.fill(fill, pad + w);
      for (let b = 0; b < n; b += L) {
        const e = Math.min(n, b + L);
        let m = 255;
        for (let i = b; i < e; i++) { const v = buf[i]; if (v < m) m = v; g[i] = m; }
        m = 255;
        for (let i = e - 1; i >= b; i--) { const v = buf[i]; if (v < m) m = v; hh[i] = m; }
      }
      for (let x = 0; x < w; x++) {
        const p = x + a + pad; // window [p, p + L)
        const u = hh[p], t = g[p + L - 1];
        rowMin[row + x] = u < t ? u : t;
      }
    }
  }
}

function channel(img: Image8, ch: number): Image8 {
  const out = image(img.w, img.h, 1);
  for (let i = 0; i < img.w * img.h; i++) out.data[i] = img.data[i * img.c + ch];
  return out;
}

/** cv2.cvtColor(BGR2GRAY) on 8-bit: 14-bit fixed-point weights. */
function gray(bgr: Image8): Image8 {
  const out = image(bgr.w, bgr.h, 1);
  for (let i = 0; i < bgr.w * bgr.h; i++) {
    out.data[i] = (bgr.data[3 * i] * 1868 + bgr.data[3 * i + 1] * 9617 + bgr.data[3 * i + 2] * 4899 + 8192) >> 14;
  }
  return out;
}

function hist(img: Image8, mask: Uint8Array): Float64Array {
  const h = new Float64Array(256);
  for (let i = 0; i < mask.length; i++) if (mask[i]) h[img.data[i]]++;
  return h;
}

/** np.searchsorted(cumsum(hist), q): the first level whose cumulative count reaches q. */
function searchsorted(histogram: Float64Array, q: number): number {
  let cdf = 0;
  for (let i = 0; i < 256; i++) { cdf += histogram[i]; if (cdf >= q) return i; }
  return 256;
}

function histStats(h: Float64Array) {
  let total = 0;
  for (const v of h) total += v;
  let mean = 0;
  for (let i = 0; i < 256; i++) mean += (h[i] / total) * i;
  let variance = 0, entropy = 0;
  for (let i = 0; i < 256; i++) {
    const p = h[i] / total;
    variance += p * (i - mean) ** 2;
    if (p > 0) entropy -= p * Math.log2(p);
  }
  return { mean, std: Math.sqrt(Math.max(0, variance)), entropy, p1: searchsorted(h, 0.01 * total),
           p99: searchsorted(h, 0.99 * total), p5: searchsorted(h, 0.05 * total) };
}

const median = (h: Float64Array) => searchsorted(h, h.reduce((a, b) => a + b, 0) / 2);

// 3x3 linear filters on 8-bit with BORDER_REFLECT_101 (cv2.Laplacian ksize 1, cv2.Sobel ksize 3), exact in ints.
function filter3(img: Image8, k: number[]): Int32Array {
  const { w, h } = img;
  const d = img.data;
  const out = new Int32Array(w * h);
  const refl = (i: number, n: number) => (n === 1 ? 0 : i < 0 ? -i : i >= n ? 2 * n - 2 - i : i);
  const [k0, k1, k2, k3, k4, k5, k6, k7, k8] = k;
  for (let y = 0; y < h; y++) {
    const ym = refl(y - 1, h) * w, y0 = y * w, yp = refl(y + 1, h) * w;
    for (let x = 0; x < w; x++) {
      const xm = x === 0 || x === w - 1 ? refl(x - 1, w) : x - 1, xp = x === 0 || x === w - 1 ? refl(x + 1, w) : x + 1;
      out[y0 + x] = k0 * d[ym + xm] + k1 * d[ym + x] + k2 * d[ym + xp] + k3 * d[y0 + xm] + k4 * d[y0 + x]
        + k5 * d[y0 + xp] + k6 * d[yp + xm] + k7 * d[yp + x] + k8 * d[yp + xp];
    }
  }
  return out;
}

/** cv2.GaussianBlur of a float image with sigma (kernel 8 sigma + 1, float32), BORDER_REFLECT_101. Each output
 *  sums its taps in kernel order (so the result does not depend on how the loops are arranged); the vertical pass
 *  runs row by row for memory order. */
function gaussian(src: Float64Array, w: number, h: number, sigma: number): Float32Array {
  const k = (pyRound(sigma * 8 + 1)) | 1, r = k >> 1;
  const kernel = new Float64Array(k);
  let sum = 0;
  for (let i = 0; i < k; i++) { kernel[i] = Math.exp(-((i - r) ** 2) / (2 * sigma * sigma)); sum += kernel[i]; }
  for (let i = 0; i < k; i++) kernel[i] = Math.fround(kernel[i] / sum);
  const refl = (i: number, n: number) => { while (i < 0 || i >= n) i = i < 0 ? -i : 2 * n - 2 - i; return i; };
  const xi = Int32Array.from({ length: w + k }, (_, i) => refl(i - r, w));
  const yi = Int32Array.from({ length: h + k }, (_, i) => refl(i - r, h) * w);
  const tmp = new Float32Array(w * h), out = new Float32Array(w * h); // float32 stores: OpenCV's float32 rows
  const inner0 = Math.min(r, w), inner1 = Math.max(inner0, w - r);
  for (let y = 0; y < h; y++) {
    const row = y * w;
    for (let x = 0; x < w; x++) {
      let s = 0;
      if (x >= inner0 && x < inner1) {
        const base = row + x - r;
        for (let i = 0; i < k; i++) s += kernel[i] * src[base + i];
      } else {
        for (let i = 0; i < k; i++) s += kernel[i] * src[row + xi[x + i]];
      }
      tmp[row + x] = s;
    }
  }
  const acc = new Float64Array(w);
  for (let y = 0; y < h; y++) {
    acc.fill(0);
    for (let i = 0; i < k; i++) {
      const kv = kernel[i], from = yi[y + i];
      for (let x = 0; x < w; x++) acc[x] += kv * tmp[from + x];
    }
    out.set(acc, y * w);
  }
  return out;
}

/** cv2.medianBlur(ksize=3): BORDER_REPLICATE. The median of a 3 x 3 window is the median of (the largest column
 *  minimum, the median column median, the smallest column maximum) once each of its 3 columns is sorted; each
 *  image column's sorted triple is shared by the 3 windows that contain it. */
function median3(img: Image8): Image8 {
  const { w, h } = img;
  const out = image(w, h, 1);
  const d = img.data, o = out.data;
  const lo = new Uint8Array(w + 2), mid = new Uint8Array(w + 2), hi = new Uint8Array(w + 2);
  for (let y = 0; y < h; y++) {
    const r0 = Math.max(0, y - 1) * w, r1 = y * w, r2 = Math.min(h - 1, y + 1) * w;
    for (let x = 0; x < w; x++) { // column x of the window rows, sorted, at index x + 1 (edges replicated below)
      let a = d[r0 + x], b = d[r1 + x], c = d[r2 + x], t;
      if (a > b) { t = a; a = b; b = t; }
      if (b > c) { t = b; b = c; c = t; }
      if (a > b) { t = a; a = b; b = t; }
      lo[x + 1] = a; mid[x + 1] = b; hi[x + 1] = c;
    }
    lo[0] = lo[1]; mid[0] = mid[1]; hi[0] = hi[1];
    lo[w + 1] = lo[w]; mid[w + 1] = mid[w]; hi[w + 1] = hi[w];
    for (let x = 0; x < w; x++) {
      const maxLo = Math.max(lo[x], lo[x + 1], lo[x + 2]), minHi = Math.min(hi[x], hi[x + 1], hi[x + 2]);
      let a = mid[x], b = mid[x + 1], c = mid[x + 2], t;
      if (a > b) { t = a; a = b; b = t; }
      if (b > c) { b = c; }
      const medMid = a > b ? a : b;
      // median of (maxLo, medMid, minHi)
      o[r1 + x] = Math.max(Math.min(maxLo, medMid), Math.min(Math.max(maxLo, medMid), minHi));
    }
  }
  return out;
}

/** quality._erode with a rectangle: cv2.erode with the outside counted as 0. */
function erodeRectZero(mask: Image8, k: number): Image8 {
  const out = morphRect(mask, k, "erode");
  const r = k >> 1;
  for (let y = 0; y < out.h; y++) {
    for (let x = 0; x < out.w; x++) if (y < r || y >= out.h - r || x < r || x >= out.w - r) out.data[y * out.w + x] = 0;
  }
  return out;
}

/** gate_view: the photo reduced by the largest of 8, 4, 2 that keeps its shorter side >= GATE_SIDE (area). */
export function gateView(bgr: Image8): Image8 {
  const k = [8, 4, 2].find((f) => Math.floor(Math.min(bgr.w, bgr.h) / f) >= Q.gate_side) ?? 1;
  if (k === 1) return bgr;
  const h = Math.floor(bgr.h / k) * k, w = Math.floor(bgr.w / k) * k;
  return resizeArea(crop(bgr, 0, 0, w, h), w / k, h / k);
}

// cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_NONE) of the field's detection mask, which detect_fov leaves as ONE
// 8-connected component: its outer border, followed as OpenCV's icvFetchContour follows it (from the first pixel
// in raster order, the outside counted as 0, every step's pixel written), as [x, y] points; null for an empty mask.
const DIRS: [number, number][] = [[1, 0], [1, -1], [0, -1], [-1, -1], [-1, 0], [-1, 1], [0, 1], [1, 1]];

export function outerContour(mask: Image8): [number, number][] | null {
  const { w, h } = mask;
  const first = mask.data.findIndex((v) => v !== 0);
  if (first < 0) return null;
  const at = (x: number, y: number) => (x >= 0 && y >= 0 && x < w && y < h ? mask.data[y * w + x] : 0);
  const x0 = first % w, y0 = Math.floor(first / w);
  let s = 4, x1 = x0, y1 = y0;
  do {
    s = (s - 1) & 7;
    x1 = x0 + DIRS[s][0]; y1 = y0 + DIRS[s][1];
  } while (at(x1, y1) === 0 && s !== 4);
  if (s === 4) return [[x0, y0]]; // a single pixel
  const pts: [number, number][] = [];
  let x3 = x0, y3 = y0;
  for (;;) {
    let t = s, x4 = x3, y4 = y3;
    while (t < 15) {
      t++;
      x4 = x3 + DIRS[t & 7][0]; y4 = y3 + DIRS[t & 7][1];
      if (at(x4, y4) !== 0) break;
    }
    t &= 7;
    pts.push([x3, y3]);
    if (x4 === x0 && y4 === y0 && x3 === x1 && y3 === y1) break;
    x3 = x4; y3 = y4;
    s = (t + 4) & 7;
  }
  return pts;
}

interface FieldCircle { center: [number, number]; radius: number; roundness: number; coverage: number }

function fitCircle(points: [number, number][]): [number, number, number] {
  // least squares of x^2 + y^2 = p x + q y + c (Kasa), by the normal equations
  let sxx = 0, sxy = 0, sx = 0, syy = 0, sy = 0, n = 0, bx = 0, by = 0, b1 = 0;
  for (const [x, y] of points) {
    const z = x * x + y * y;
    sxx += x * x; sxy += x * y; sx += x; syy += y * y; sy += y; n++;
    bx += x * z; by += y * z; b1 += z;
  }
  const m = [[sxx, sxy, sx], [sxy, syy, sy], [sx, sy, n]], b = [bx, by, b1];
  const det = (a: number[][]) => a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
    + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
  const d = det(m);
  const solve = (col: number) => det(m.map((row, i) => row.map((v, j) => (j === col ? b[i] : v)))) / d;
  const p = solve(0), q = solve(1), c = solve(2);
  const cx = p / 2, cy = q / 2;
  return [cx, cy, Math.sqrt(Math.max(c + cx * cx + cy * cy, 1e-9))];
}

/** field_circle: the circle through the field's visible arc (see edge_runtime.quality.field_circle). */
export function fieldCircle(fov: FieldOfView, shape: [number, number]): FieldCircle {
  const s = fov.maskScale, hm = fov.mask.h, wm = fov.mask.w;
  const fallback: FieldCircle = { center: fov.center, radius: fov.radius, roundness: 0, coverage: 1 };
  const points = outerContour(fov.mask);
  if (!points) return fallback;
  let arc = points.filter(([x, y]) => x > 1 && x < wm - 2 && y > 1 && y < hm - 2);
  const colCount = new Map<number, number>(), rowCount = new Map<number, number>();
  for (const [x, y] of arc) { colCount.set(x, (colCount.get(x) ?? 0) + 1); rowCount.set(y, (rowCount.get(y) ?? 0) + 1); }
  const run = Q.arc.straight_edge * Math.max(hm, wm) / 2;
  arc = arc.filter(([x, y]) => colCount.get(x)! < run && rowCount.get(y)! < run);
  if (arc.length < Q.arc.min_points) return fallback;
  const cand: [number, number, number][] = [];
  for (const [a, b, c] of Q.arc.samples) {
    const [ax, ay] = arc[Math.floor(a * arc.length)], [bx, by] = arc[Math.floor(b * arc.length)];
    const [cx, cy] = arc[Math.floor(c * arc.length)];
    const d = 2 * (ax * (by - cy) + bx * (cy - ay) + cx * (ay - by));
    if (Math.abs(d) < 1e-9) continue;
    const a2 = ax * ax + ay * ay, b2 = bx * bx + by * by, c2 = cx * cx + cy * cy;
    const ux = (a2 * (by - cy) + b2 * (cy - ay) + c2 * (ay - by)) / d;
    const uy = (a2 * (cx - bx) + b2 * (ax - cx) + c2 * (bx - ax)) / d;
    const r = Math.hypot(ax - ux, ay - uy);
    if (Number.isFinite(r) && r < 2 * Math.max(hm, wm)) cand.push([ux, uy, r]);
  }
  if (!cand.length) return fallback;
  const step = Math.max(1, Math.floor(arc.length / 160));
  const votes = arc.filter((_, i) => i % step === 0);
  let best = 0, bestCount = -1;
  cand.forEach(([ux, uy, r], i) => {
    const tol = Math.max(Q.arc.tolerance * r, 1);
    let count = 0;
    for (const [x, y] of votes) if (Math.abs(Math.hypot(x - ux, y - uy) - r) <= tol) count++;
    if (count > bestCount) { bestCount = count; best = i; }
  });
  const [bx, by, br] = cand[best];
  const inliers = arc.filter(([x, y]) => Math.abs(Math.hypot(x - bx, y - by) - br) <= Math.max(Q.arc.tolerance * br, 1));
  const [cx, cy, radius] = inliers.length >= 3 ? fitCircle(inliers) : [bx, by, br];
  const tol = Math.max(Q.arc.tolerance * radius, 1);
  const roundness = arc.filter(([x, y]) => Math.abs(Math.hypot(x - cx, y - cy) - radius) <= tol).length / arc.length;
  if (roundness < Q.not_fundus.min_roundness) return { center: fov.center, radius: fov.radius, roundness, coverage: 1 };
  let inside = 0, total = 0;
  for (let i = 0; i < 41; i++) {
    for (let j = 0; j < 41; j++) {
      const gx = -1 + (2 * j) / 40, gy = -1 + (2 * i) / 40;
      if (gx * gx + gy * gy > 1) continue;
      total++;
      const px = (cx + radius * gx) / s, py = (cy + radius * gy) / s;
      if (px >= 0 && px < shape[1] && py >= 0 && py < shape[0]) inside++;
    }
  }
  return { center: [cx / s, cy / s], radius: radius / s, roundness, coverage: inside / total };
}

/** field_hole: the largest black hole inside the field (background of the detection mask that no 4-connected path
 *  of background joins to the frame's border), as a share of the field with its holes; pixel counts. */
export function fieldHole(fov: FieldOfView): number {
  const { w, h } = fov.mask;
  const background = image(w, h, 1);
  let field = 0;
  for (let i = 0; i < w * h; i++) { const on = fov.mask.data[i] !== 0; background.data[i] = on ? 0 : 255; field += on ? 1 : 0; }
  let largest = 0, enclosed = 0;
  for (const s of connectedComponents(background, 4).stats) {
    if (s.left > 0 && s.top > 0 && s.right + 1 < w && s.bottom + 1 < h) { largest = Math.max(largest, s.area); enclosed += s.area; }
  }
  return largest ? largest / (field + enclosed) : 0;
}

/** redness: (median red - median blue) / (median red + 1) inside the field, on the detection-size copy. */
function redness(bgr: Image8, fov: FieldOfView): number {
  const small = fov.maskScale === 1 ? bgr : fov.small ?? resizeArea(bgr, fov.mask.w, fov.mask.h);
  const blue = new Float64Array(256), red = new Float64Array(256);
  for (let i = 0; i < fov.mask.data.length; i++) {
    if (!fov.mask.data[i]) continue;
    blue[small.data[3 * i]]++; red[small.data[3 * i + 2]]++;
  }
  const mb = median(blue), mr = median(red);
  return (mr - mb) / (mr + 1);
}

/** surround_level: the level of a flat dark-grey surround in the frame's corners (the brightest lit corner's
 * maximum of the brightest channel), or null when a lit corner is not flat or not dark, or no corner is lit. */
export function surroundLevel(bgr: Image8): number | null {
  const side = Math.max(2, pyRound(SURROUND_CORNER * Math.min(bgr.w, bgr.h)));
  let level: number | null = null;
  for (const [x0, y0] of [[0, 0], [bgr.w - side, 0], [0, bgr.h - side], [bgr.w - side, bgr.h - side]]) {
    let low = 255, high = 0;
    for (let y = y0; y < y0 + side; y++) {
      for (let x = x0; x < x0 + side; x++) {
        const i = 3 * (y * bgr.w + x);
        const v = Math.max(bgr.data[i], bgr.data[i + 1], bgr.data[i + 2]);
        if (v < low) low = v;
        if (v > high) high = v;
      }
    }
    if (high <= FOV_THRESHOLD) continue; // a black corner: already outside the field
    if (high - low > SURROUND_SPREAD || high > MAX_SURROUND_LEVEL) return null;
    level = Math.max(level ?? 0, high);
  }
  return level;
}

/** surround_fov: the field above a flat dark-grey surround when the field found covers more than max_fov_fraction
 * of the frame because the surround is lighter than the field-of-view threshold; else the field as found. */
export function surroundFov(bgr: Image8, fov: FieldOfView): FieldOfView {
  if (fov.fraction <= Q.not_fundus.max_fov_fraction) return fov;
  const level = surroundLevel(bgr);
  return level === null ? fov : detectFov(bgr, level + FOV_THRESHOLD);
}

/** not_fundus_reason: no dark surround, no round field, or a blank field; null for a fundus photo. */
export function notFundusReason(m: Record<string, number>): string | null {
  const nf = Q.not_fundus;
  const advice = "photograph the retina through the pupil, with the camera's round field in the frame";
  if (m.fov_fraction > nf.max_fov_fraction) return `${nf.text}: the frame has no dark surround around a round field; ${advice}`;
  if (m.roundness < nf.min_roundness && m.mean >= nf.min_mean_for_arc) {
    return `${nf.text}: the bright region is not a round field of view (roundness ${m.roundness.toFixed(2)} vs ${nf.min_roundness}); ${advice}`;
  }
  if (nf.max_field_hole !== null && (m.field_hole ?? 0) > nf.max_field_hole && m.mean >= nf.min_mean_for_arc) {
    return `${nf.text}: a black disc inside the lit region (a pupil seen from outside the eye? hole ${m.field_hole.toFixed(3)} of the field vs ${nf.max_field_hole}); ${advice}`;
  }
  if (m.dynamic_range < nf.min_field_range) {
    return `${nf.text}: the field is blank (luminance range ${m.dynamic_range.toFixed(0)} levels vs ${nf.min_field_range.toFixed(0)}); ${advice}`;
  }
  return null;
}

// ---- the gate ----

/** _shrink: an integer-factor area average first when shrinking by 2x or more, then linear. */
function shrink(img: Image8, sw: number, sh: number): Image8 {
  const k = Math.floor(Math.min(img.w / sw, img.h / sh));
  if (k >= 2) {
    const h = Math.floor(img.h / k) * k, w = Math.floor(img.w / k) * k;
    img = resizeArea(crop(img, 0, 0, w, h), w / k, h / k);
  }
  return img.w === sw && img.h === sh ? img : resizeLinear(img, sw, sh);
}

function fovMaskRegion(fov: FieldOfView, x0: number, y0: number, w: number, h: number): Image8 {
  const s = fov.maskScale;
  const top = Math.trunc(y0 * s), bottom = Math.min(fov.mask.h, Math.ceil((y0 + h) * s));
  const left = Math.trunc(x0 * s), right = Math.min(fov.mask.w, Math.ceil((x0 + w) * s));
  return crop(fov.mask, left, top, Math.max(0, right - left), Math.max(0, bottom - top));
}

/** field_crop: the field of view at WORK_SIZE and its eroded mask. */
export function fieldCrop(bgr: Image8, fov: FieldOfView): { small: Image8; inner: Uint8Array } {
  const region = crop(bgr, fov.x, fov.y, fov.w, fov.h);
  const scale = WORK_SIZE / Math.max(region.w, region.h);
  const sw = Math.max(8, pyRound(region.w * scale)), sh = Math.max(8, pyRound(region.h * scale));
  const small = shrink(region, sw, sh);
  const mask = resizeNearest(fovMaskRegion(fov, fov.x, fov.y, fov.w, fov.h), sw, sh);
  const eroded = morphEllipse(mask, 9, "erode", true);
  const inner = new Uint8Array(eroded.data.length);
  for (let i = 0; i < inner.length; i++) inner[i] = eroded.data[i] > 0 ? 1 : 0;
  return { small, inner };
}

function haarHfRatio(box: Image8): number {
  const h = Math.floor(box.h / 4) * 4, w = Math.floor(box.w / 4) * 4;
  if (!h || !w) return 0;
  let energy = 0;
  const approx = new Float64Array((h / 4) * (w / 4));
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = box.data[y * box.w + x];
      energy += v * v;
      approx[Math.floor(y / 4) * (w / 4) + Math.floor(x / 4)] += v;
    }
  }
  let approxSq = 0, approxSum = 0;
  for (let i = 0; i < approx.length; i++) {
    const a = Math.fround(approx[i] * Math.fround(1 / 16));
    approxSq += a * a; approxSum += a;
  }
  const approxEnergy = 16 * approxSq;
  const detail = energy - approxEnergy;
  const mean = approxSum / approx.length;
  const total = detail + approxEnergy - 16 * approx.length * mean * mean;
  return total > 0 ? detail / total : 0;
}

function patches(whiteness: Image8, lum: Image8, mask: Uint8Array, whiteMedian: number, lumMedian: number): [number, number] {
  const h = Math.floor(whiteness.h / PATCH_SCALE) * PATCH_SCALE, w = Math.floor(whiteness.w / PATCH_SCALE) * PATCH_SCALE;
  const sw = w / PATCH_SCALE, sh = h / PATCH_SCALE;
  const mask255 = image(whiteness.w, whiteness.h, 1);
  for (let i = 0; i < mask.length; i++) mask255.data[i] = mask[i] * 255;
  const inside = resizeArea(crop(mask255, 0, 0, w, h), sw, sh);
  const insideFlags = new Uint8Array(inside.data.length);
  for (let i = 0; i < insideFlags.length; i++) insideFlags[i] = inside.data[i] === 255 ? 255 : 0;
  if (!insideFlags.some((v) => v)) return [0, 0];
  const side = Math.max(h, w) / PATCH_SCALE;
  const white = resizeArea(crop(whiteness, 0, 0, w, h), sw, sh);
  for (let i = 0; i < white.data.length; i++) white.data[i] &= insideFlags[i];
  const eroded = morphEllipse(white, Math.max(3, pyRound(PATCH_DIAMETER * side) | 1), "erode");
  const small = resizeArea(crop(lum, 0, 0, w, h), sw, sh);
  for (let i = 0; i < small.data.length; i++) small.data[i] |= 255 - insideFlags[i];
  const dilated = morphEllipse(small, Math.max(3, pyRound(DARK_PATCH_DIAMETER * side) | 1), "dilate");
  let maxEroded = 0, minDilated = 255;
  for (const v of eroded.data) if (v > maxEroded) maxEroded = v;
  for (const v of dilated.data) if (v < minDilated) minDilated = v;
  return [Math.max(0, maxEroded - whiteMedian), Math.max(0, 1 - minDilated / Math.max(lumMedian, 1))];
}

function blockiness(bgr: Image8, fov: FieldOfView): number {
  const { x: x0, y: y0, w, h } = fov;
  const green = channel(crop(bgr, x0, y0, w, h), 1);
  let mask = fovMaskRegion(fov, x0, y0, w, h);
  const maxPeriod = Math.max(...BLOCK_PERIODS);
  if (green.h < 2 * maxPeriod || green.w < 2 * maxPeriod || !mask.data.length) return 1;
  const band = Math.max(3, pyRound(BLOCK_RIM * Math.max(mask.w, mask.h)) | 1);
  mask = resizeNearest(erodeRectZero(mask, band), w, h);
  const ratios: Record<number, number[]> = {};
  for (const p of BLOCK_PERIODS) ratios[p] = [];
  for (const vertical of [true, false]) {
    // vertical: steps between rows y-1 and y, summed along each row; else between columns, summed along columns
    const n = vertical ? h - 1 : w - 1;
    const sums = new Float64Array(n), countsArr = new Float64Array(n);
    for (let y = 0; y < (vertical ? h - 1 : h); y++) {
      for (let x = 0; x < (vertical ? w : w - 1); x++) {
        const a = vertical ? (y + 1) * w + x : y * w + x + 1, b = y * w + x;
        const both = mask.data[a] & mask.data[b];
        if (!both) continue;
        const k = vertical ? y : x;
        sums[k] += Math.abs(green.data[a] - green.data[b]) & both;
        countsArr[k] += both / 255;
      }
    }
    const offset = vertical ? y0 : x0;
    for (const p of BLOCK_PERIODS) {
      const sp = new Float64Array(p), np_ = new Float64Array(p);
      for (let i = 0; i < n; i++) { const ph = (i + 1 + offset) % p; sp[ph] += sums[i]; np_[ph] += countsArr[i]; }
      if (Math.min(...np_) < 1) return 1;
      let k = 0;
      for (let i = 1; i < p; i++) if (sp[i] / np_[i] > sp[k] / np_[k]) k = i;
      const sTotal = sp.reduce((a, b) => a + b, 0), nTotal = np_.reduce((a, b) => a + b, 0);
      const rest = (sTotal - sp[k]) / (nTotal - np_[k]);
      ratios[p].push(sp[k] / np_[k] / Math.max(rest, 1e-3));
    }
  }
  return Math.max(...BLOCK_PERIODS.map((p) => ratios[p].reduce((a, b) => a + b, 0) / ratios[p].length));
}

/** quality_metrics: every indicator of one photo (NoFundusError when there is no field of view). */
export function qualityMetrics(photo: Image8, fov?: FieldOfView | null): Record<string, number> {
  const bgr = gateView(photo);
  fov = surroundFov(bgr, fov && bgr === photo ? fov : detectFov(bgr));
  const { small, inner: mask } = fieldCrop(bgr, fov);
  let nInner = 0;
  for (const v of mask) nInner += v;
  if (nInner < 100) throw new ImageError("field of view too small to assess quality");
  const [blue, green, red] = [channel(small, 0), channel(small, 1), channel(small, 2)];
  const lum = gray(small);
  const lumHist = hist(lum, mask);
  const stats = histStats(lumHist);
  const n = small.w * small.h;
  const whiteness = image(small.w, small.h, 1), value = image(small.w, small.h, 1);
  for (let i = 0; i < n; i++) {
    whiteness.data[i] = Math.min(blue.data[i], green.data[i], red.data[i]);
    value.data[i] = Math.max(blue.data[i], green.data[i], red.data[i]);
  }
  const whiteHist = hist(whiteness, mask);
  const darkChannel = histStats(whiteHist).p5;
  let greenSum = 0;
  for (let i = 0; i < n; i++) if (mask[i]) greenSum += green.data[i];
  const greenMean = Math.max(greenSum / nInner, 1);

  const lap = filter3(green, [0, 1, 0, 1, -4, 1, 0, 1, 0]);
  let lapSum = 0, lapSq = 0;
  for (let i = 0; i < n; i++) if (mask[i]) { lapSum += lap[i]; lapSq += lap[i] * lap[i]; }
  const lapMean = lapSum / nInner;
  const lapVar = Math.max(0, lapSq / nInner - lapMean * lapMean);
  const gx = filter3(green, [-1, 0, 1, -2, 0, 2, -1, 0, 1]), gy = filter3(green, [-1, -2, -1, 0, 0, 0, 1, 2, 1]);
  let ten = 0;
  for (let i = 0; i < n; i++) if (mask[i]) ten += gx[i] * gx[i] + gy[i] * gy[i];
  const tenengrad = ten / nInner;

  const maskImg = image(small.w, small.h, 1, mask);
  let core = erodeRectZero(maskImg, 31).data;
  let coreCount = 0;
  for (let i = 0; i < core.length; i++) if (core[i]) coreCount++;
  if (coreCount < 100) core = mask;
  const W = small.w, H = small.h;
  const directions: [[number, number], [number, number], number][] = [
    [[0, 0], [0, 1], 1], [[0, 0], [1, 0], 1], [[1, 0], [0, 1], 2], [[0, 0], [1, 1], 2]];
  const gd = green.data;
  const energies = directions.map(([[ay, ax], [by, bx], norm]) => {
    let sum = 0, count = 0;
    const shift = (by - ay) * W + (bx - ax);
    for (let y = 0; y < H - 1; y++) {
      const row = (y + ay) * W + ax;
      for (let x = 0; x < W - 1; x++) {
        const i = row + x;
        if (!core[i]) continue;
        const d = gd[i] - gd[i + shift];
        sum += d * d; count++;
      }
    }
    return sum / Math.max(count, 1) / norm;
  });
  const g = Float64Array.from(green.data);
  const blurred = gaussian(g, W, H, 2.0);
  let detail = 0;
  for (let i = 0; i < n; i++) if (mask[i]) detail += (g[i] - blurred[i]) ** 2;
  const detailEnergy = detail / nInner;

  let glare = 0, redClipped = 0;
  for (let i = 0; i < n; i++) {
    if (!mask[i]) continue;
    if (value.data[i] > 235 && (value.data[i] - whiteness.data[i]) * 255 < 40 * value.data[i]) glare++;
    if (red.data[i] > 249) redClipped++;
  }
  let bx0 = W, by0 = H, bx1 = -1, by1 = -1;
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) if (mask[y * W + x]) {
    bx0 = Math.min(bx0, x); bx1 = Math.max(bx1, x); by0 = Math.min(by0, y); by1 = Math.max(by1, y);
  }
  const box = image(bx1 - bx0 + 1, by1 - by0 + 1, 1);
  for (let y = by0; y <= by1; y++) for (let x = bx0; x <= bx1; x++) {
    box.data[(y - by0) * box.w + x - bx0] = mask[y * W + x] ? green.data[y * W + x] : 0;
  }
  const med = median3(green);
  const shifted = image(W, H, 1);
  for (let i = 0; i < n; i++) shifted.data[i] = sat8(green.data[i] - med.data[i] + 128);
  const hpMedian = median(hist(shifted, mask));
  const dev = image(W, H, 1);
  for (let i = 0; i < n; i++) dev.data[i] = sat8(Math.abs(shifted.data[i] - hpMedian));
  const noise = 1.4826 * median(hist(dev, mask));

  const lumMedian = median(lumHist);
  const [palePatch, darkPatch] = patches(whiteness, lum, mask, median(whiteHist), lumMedian);
  const tH = Math.floor(H / 3), tW = Math.floor(W / 3);
  const bandMean = (y0: number, y1: number, x0: number, x1: number): number | null => {
    let s = 0, c = 0;
    for (let y = y0; y < y1; y++) for (let x = x0; x < x1; x++) if (mask[y * W + x]) { s += lum.data[y * W + x]; c++; }
    return c ? s / c : null;
  };
  const thirds = [bandMean(0, tH, 0, W), bandMean(H - tH, H, 0, W), bandMean(0, H, 0, tW), bandMean(0, H, W - tW, W)]
    .filter((v): v is number => v !== null);
  const under = lumHist.slice(0, 15).reduce((a, b) => a + b, 0), over = lumHist.slice(246).reduce((a, b) => a + b, 0);
  const darkArea = lumHist.slice(0, Math.ceil(0.45 * lumMedian)).reduce((a, b) => a + b, 0);
  const brightArea = lumHist.slice(191).reduce((a, b) => a + b, 0);
  const [wImg, hImg] = [bgr.w, bgr.h];
  const circle = fieldCircle(fov, [hImg, wImg]);
  return {
    fov_fraction: fov.fraction,
    decentering: Math.hypot(circle.center[0] - wImg / 2, circle.center[1] - hImg / 2) / circle.radius,
    field_diameter: 2 * circle.radius,
    field_coverage: circle.coverage,
    roundness: circle.roundness,
    ...(Q.not_fundus.max_field_hole === null ? {} : { field_hole: fieldHole(fov) }),
    redness: redness(bgr, fov),
    mean: stats.mean,
    std: stats.std,
    entropy: stats.entropy,
    dynamic_range: stats.p99 - stats.p1,
    laplacian_var: lapVar,
    tenengrad,
    wavelet_hf_ratio: haarHfRatio(box),
    directional_sharpness: Math.min(...energies) / greenMean ** 2 * 1000,
    sharpness_isotropy: Math.min(...energies) / Math.max(Math.max(...energies), 1e-9),
    local_contrast: Math.sqrt(detailEnergy) / greenMean,
    dark_channel: darkChannel,
    underexposed: under / nInner,
    overexposed: over / nInner,
    red_clipped: redClipped / nInner,
    dark_area: darkArea / nInner,
    bright_area: brightArea / nInner,
    pale_patch: palePatch,
    dark_patch: darkPatch,
    illumination_balance: thirds.length ? Math.min(...thirds) / Math.max(Math.max(...thirds), 1) : 1,
    glare: glare / nInner,
    noise,
    blockiness: blockiness(bgr, fov),
  };
}

/** Python's format(x, ".4g"). */
export function formatG4(x: number): string {
  if (x === 0) return "0";
  if (!Number.isFinite(x)) return Number.isNaN(x) ? "nan" : x > 0 ? "inf" : "-inf";
  const [m, e] = x.toExponential(3).split("e");
  const exp = Number(e);
  const strip = (s: string) => (s.includes(".") ? s.replace(/0+$/, "").replace(/\.$/, "") : s);
  if (exp < -4 || exp >= 4) return `${strip(m)}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  return strip(x.toFixed(3 - exp));
}

/** The learned gradability score (quality_model.GradabilityModel.logit), with its P(ungradable) at its point. */
function learned(metrics: Record<string, number>): { probability: number; threshold: number } | null {
  const model = Q.learned;
  if (!model) return null;
  let logit = model.intercept;
  model.features.forEach((f, i) => {
    const v = model.log_features.includes(f) ? Math.log(Math.max(metrics[f], 0) + model.log_offset) : metrics[f];
    logit += ((v - model.mean[i]) / model.scale[i]) * model.coef[i];
  });
  return { probability: sigmoid(logit, model.operating_point.temperature), threshold: model.operating_point.threshold };
}

/** verdict(): the rules, thresholds and learned model are Python's own (contract.generated.json). */
export function verdict(metrics: Record<string, number>): QualityReport {
  const { rules, thresholds } = Q;
  const reasons: string[] = [];
  let worst = Infinity;
  for (const rule of rules) {
    const limit = thresholds[rule.limit], value = metrics[rule.metric];
    const ok = rule.op === ">=" ? value >= limit : value <= limit;
    if (!ok) reasons.push(`${rule.reason} (${rule.metric} ${formatG4(value)} vs limit ${formatG4(limit)})`);
    worst = Math.min(worst, ((rule.op === ">=" ? value - limit : limit - value)) / (Math.abs(limit) + 1e-9));
  }
  const score = learned(metrics);
  const all = { ...metrics };
  if (score) {
    all.learned_ungradable = score.probability;
    worst = Math.min(worst, (score.threshold - score.probability) / score.threshold);
    if (score.probability >= score.threshold) {
      reasons.push(`${Q.learned!.name}: P(ungradable) ${score.probability.toFixed(2)} >= ${score.threshold.toFixed(2)}, poor overall `
                   + "(focus, exposure and contrast together): clean the lens, refocus and re-capture");
    }
  }
  return { gradable: reasons.length === 0, score: round4(Math.min(1, Math.max(0, 0.5 + 0.5 * Math.tanh(2 * worst)))),
           reasons, metrics: round6All(all) };
}

const round4 = (x: number) => Number(x.toFixed(4));
const round6All = (m: Record<string, number>) => Object.fromEntries(Object.entries(m).map(([k, v]) => [k, Number(v.toFixed(6))]));

/** assess(): not a fundus photo (score 0, one reason), or the verdict with the learned score. */
export function assess(bgr: Image8, fov?: FieldOfView | null): QualityReport {
  let metrics: Record<string, number>;
  try {
    metrics = qualityMetrics(bgr, fov);
  } catch (err) {
    if (!(err instanceof ImageError)) throw err;
    return { gradable: false, score: 0, reasons: [`${Q.not_fundus.text}: ${err.message}`], metrics: {} };
  }
  const refusal = notFundusReason(metrics);
  if (refusal) return { gradable: false, score: 0, reasons: [refusal], metrics: round6All(metrics) };
  return verdict(metrics);
}
