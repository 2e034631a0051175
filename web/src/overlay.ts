// The CAM overlay for the screen and the server's review page (edge_runtime.cam.render_overlay): the grade's map
// upsampled over the displayed crop and blended as a JET colour map, at display size only.
import type { Image8 } from "./image";
import type { Cam } from "./decision";
import type { Preprocessed } from "./preprocess";

export const DISPLAY_SIDE = 512;
const ALPHA = 0.45;

// OpenCV's COLORMAP_JET as piecewise-linear channels (display only).
function jet(v: number): [number, number, number] {
  const f = (x: number) => Math.round(255 * Math.min(1, Math.max(0, x)));
  return [f(1.5 - Math.abs(4 * v - 3)), f(1.5 - Math.abs(4 * v - 2)), f(1.5 - Math.abs(4 * v - 1))];
}

// cv2.resize(INTER_CUBIC, a = -0.75) of the h x w grid to side x side, half-pixel centres: per output column and
// row the 4 source taps and their weights, then a separable pass (display only, so float64 throughout).
function cubicTaps(size: number, side: number): { idx: Int32Array; wt: Float64Array } {
  const kernel = (t: number) => {
    const a = -0.75, u = Math.abs(t);
    return u <= 1 ? ((a + 2) * u - (a + 3)) * u * u + 1 : u < 2 ? (((u - 5) * u + 8) * u - 4) * a : 0;
  };
  const idx = new Int32Array(side * 4), wt = new Float64Array(side * 4);
  for (let p = 0; p < side; p++) {
    const s = (p + 0.5) * size / side - 0.5, s0 = Math.floor(s);
    for (let j = 0; j < 4; j++) {
      idx[p * 4 + j] = Math.min(size - 1, Math.max(0, s0 + j - 1));
      wt[p * 4 + j] = kernel(s - (s0 + j - 1));
    }
  }
  return { idx, wt };
}

function upsample(cam: Cam, side: number): Float32Array {
  const xs = cubicTaps(cam.w, side), ys = cubicTaps(cam.h, side);
  const rows = new Float64Array(cam.h * side);
  for (let j = 0; j < cam.h; j++) {
    for (let p = 0; p < side; p++) {
      let v = 0;
      for (let t = 0; t < 4; t++) v += cam.grid[j * cam.w + xs.idx[p * 4 + t]] * xs.wt[p * 4 + t];
      rows[j * side + p] = v;
    }
  }
  const out = new Float32Array(side * side);
  for (let q = 0; q < side; q++) {
    for (let p = 0; p < side; p++) {
      let v = 0;
      for (let t = 0; t < 4; t++) v += rows[ys.idx[q * 4 + t] * side + p] * ys.wt[q * 4 + t];
      out[q * side + p] = Math.min(1, Math.max(0, v));
    }
  }
  return out;
}

/** The photo (downscaled to DISPLAY_SIDE) with the CAM blended over the field of view, as a canvas. */
export function renderOverlay(bgr: Image8, cam: Cam | null, pre: Preprocessed | null): OffscreenCanvas {
  const scale = Math.min(1, DISPLAY_SIDE / Math.max(bgr.w, bgr.h));
  const w = Math.max(1, Math.round(bgr.w * scale)), h = Math.max(1, Math.round(bgr.h * scale));
  const canvas = new OffscreenCanvas(w, h);
  const ctx = canvas.getContext("2d")!;
  const out = ctx.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    const sy = Math.min(bgr.h - 1, Math.floor(y / scale));
    for (let x = 0; x < w; x++) {
      const s = (sy * bgr.w + Math.min(bgr.w - 1, Math.floor(x / scale))) * 3, d = (y * w + x) * 4;
      out.data[d] = bgr.data[s + 2]; out.data[d + 1] = bgr.data[s + 1]; out.data[d + 2] = bgr.data[s]; out.data[d + 3] = 255;
    }
  }
  if (cam && pre) {
    const side = Math.max(1, Math.round(pre.squareSide * scale));
    const square = upsample(cam, side);
    const [cx, cy, cw, ch] = pre.cropBox.map((v) => Math.round(v * scale));
    const left = Math.round(pre.pad[0] * scale), top = Math.round(pre.pad[1] * scale);
    for (let y = 0; y < Math.min(ch, h - cy, side - top); y++) {
      for (let x = 0; x < Math.min(cw, w - cx, side - left); x++) {
        const heat = square[(y + top) * side + x + left];
        const [r, g, b] = jet(heat), a = ALPHA * heat, d = ((y + cy) * w + x + cx) * 4;
        out.data[d] = out.data[d] * (1 - a) + r * a;
        out.data[d + 1] = out.data[d + 1] * (1 - a) + g * a;
        out.data[d + 2] = out.data[d + 2] * (1 - a) + b * a;
      }
    }
  }
  ctx.putImageData(out, 0, 0);
  return canvas;
}
