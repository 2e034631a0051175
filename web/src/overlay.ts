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

function bicubicAt(cam: Cam, side: number, px: number, py: number): number {
  // Sample the h x w grid stretched over side x side with half-pixel centres (cv2.resize INTER_CUBIC, a = -0.75).
  const sx = (px + 0.5) * cam.w / side - 0.5, sy = (py + 0.5) * cam.h / side - 0.5;
  const x0 = Math.floor(sx), y0 = Math.floor(sy);
  const kernel = (t: number) => {
    const a = -0.75, u = Math.abs(t);
    return u <= 1 ? ((a + 2) * u - (a + 3)) * u * u + 1 : u < 2 ? (((u - 5) * u + 8) * u - 4) * a : 0;
  };
  let sum = 0;
  for (let j = -1; j <= 2; j++) {
    const yy = Math.min(cam.h - 1, Math.max(0, y0 + j)), wy = kernel(sy - (y0 + j));
    for (let i = -1; i <= 2; i++) {
      const xx = Math.min(cam.w - 1, Math.max(0, x0 + i));
      sum += cam.grid[yy * cam.w + xx] * wy * kernel(sx - (x0 + i));
    }
  }
  return Math.min(1, Math.max(0, sum));
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
    const [cx, cy, cw, ch] = pre.cropBox.map((v) => Math.round(v * scale));
    const left = Math.round(pre.pad[0] * scale), top = Math.round(pre.pad[1] * scale);
    for (let y = 0; y < Math.min(ch, h - cy, side - top); y++) {
      for (let x = 0; x < Math.min(cw, w - cx, side - left); x++) {
        const heat = bicubicAt(cam, side, x + left, y + top);
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
