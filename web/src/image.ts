// 8-bit images as OpenCV holds them (interleaved, BGR for photos) and the few OpenCV resizes the pipeline uses.
// Each port names the OpenCV routine it reproduces; the golden fixtures (web/fixtures) bind them to edge_runtime.

export interface Image8 {
  readonly w: number;
  readonly h: number;
  readonly c: number; // channels: 3 (BGR or RGB) or 1
  readonly data: Uint8Array; // row-major, interleaved
}

export function image(w: number, h: number, c: number, data?: Uint8Array): Image8 {
  return { w, h, c, data: data ?? new Uint8Array(w * h * c) };
}

/** Python's round(): half to even (numpy and the built-in agree on this). */
export function pyRound(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** OpenCV's cvRound / saturate_cast<uchar>(float): round half to even, clamp to 0..255. */
export function sat8(x: number): number {
  if (!(x > 0)) return 0;
  if (x >= 255) return 255;
  return pyRound(x);
}

/** RGBA (canvas ImageData) -> BGR, alpha composited on black as edge_runtime.preprocess.decode_image does. */
export function bgrFromRgba(rgba: Uint8ClampedArray | Uint8Array, w: number, h: number): Image8 {
  const out = new Uint8Array(w * h * 3);
  for (let i = 0, j = 0; i < w * h * 4; i += 4, j += 3) {
    const a = rgba[i + 3];
    if (a === 255) {
      out[j] = rgba[i + 2]; out[j + 1] = rgba[i + 1]; out[j + 2] = rgba[i];
    } else { // float32 multiply then truncation, as decode_image's astype does
      const alpha = Math.fround(a / 255);
      out[j] = Math.trunc(Math.fround(rgba[i + 2] * alpha));
      out[j + 1] = Math.trunc(Math.fround(rgba[i + 1] * alpha));
      out[j + 2] = Math.trunc(Math.fround(rgba[i] * alpha));
    }
  }
  return image(w, h, 3, out);
}

/** An opaque RGBA image (a decoded JPEG) reduced by ``k`` to ceil(w / k) x ceil(h / k) BGR, each pixel the rounded
 *  mean of its k x k block (the last row and column of blocks clipped to the image), in one pass. This stands in
 *  for libjpeg's decode at 1/k scale, which browsers do not offer: like it, every output pixel comes from its own
 *  block (cv2.resize(INTER_AREA) to the same size would spread a fractional block over the whole image). */
export function reduceRgbaToBgr(rgba: Uint8ClampedArray | Uint8Array, w: number, h: number, k: number): Image8 {
  const dw = Math.ceil(w / k), dh = Math.ceil(h / k);
  const out = new Uint8Array(dw * dh * 3);
  const acc = new Uint32Array(dw * 3);
  for (let dy = 0; dy < dh; dy++) {
    acc.fill(0);
    const y0 = dy * k, y1 = Math.min(h, y0 + k);
    for (let y = y0; y < y1; y++) {
      let i = y * w * 4;
      for (let x = 0; x < w; x++, i += 4) {
        const d = ((x / k) | 0) * 3;
        acc[d] += rgba[i + 2]; acc[d + 1] += rgba[i + 1]; acc[d + 2] += rgba[i];
      }
    }
    const rows = y1 - y0, o = dy * dw * 3;
    for (let dx = 0; dx < dw; dx++) {
      const count = rows * (Math.min(w, (dx + 1) * k) - dx * k), half = count >> 1;
      for (let c = 0; c < 3; c++) out[o + dx * 3 + c] = ((acc[dx * 3 + c] + half) / count) | 0;
    }
  }
  return image(dw, dh, 3, out);
}

/** img[y:y+h, x:x+w] as a copy. */
export function crop(img: Image8, x: number, y: number, w: number, h: number): Image8 {
  const out = new Uint8Array(w * h * img.c);
  const rowBytes = w * img.c;
  for (let r = 0; r < h; r++) {
    const from = ((y + r) * img.w + x) * img.c;
    out.set(img.data.subarray(from, from + rowBytes), r * rowBytes);
  }
  return image(w, h, img.c, out);
}

interface AreaTab { di: Int32Array; si: Int32Array; alpha: Float64Array }

// cv::computeResizeAreaTab: for each destination cell, the source cells it covers and their shares.
function areaTab(ssize: number, dsize: number, scale: number): AreaTab {
  const di: number[] = [], si: number[] = [], alpha: number[] = [];
  for (let dx = 0; dx < dsize; dx++) {
    const fsx1 = dx * scale, fsx2 = fsx1 + scale;
    const cell = Math.min(scale, ssize - fsx1);
    let sx1 = Math.ceil(fsx1), sx2 = Math.floor(fsx2);
    sx2 = Math.min(sx2, ssize - 1);
    sx1 = Math.min(sx1, sx2);
    if (sx1 - fsx1 > 1e-3) { di.push(dx); si.push(sx1 - 1); alpha.push(Math.fround((sx1 - fsx1) / cell)); }
    for (let sx = sx1; sx < sx2; sx++) { di.push(dx); si.push(sx); alpha.push(Math.fround(1 / cell)); }
    if (fsx2 - sx2 > 1e-3) {
      di.push(dx); si.push(sx2); alpha.push(Math.fround(Math.min(Math.min(fsx2 - sx2, 1), cell) / cell));
    }
  }
  return { di: Int32Array.from(di), si: Int32Array.from(si), alpha: Float64Array.from(alpha) };
}

/** cv2.resize(..., interpolation=INTER_AREA) for shrinking (both factors >= 1). */
export function resizeArea(src: Image8, dw: number, dh: number): Image8 {
  const c = src.c;
  // OpenCV's own arithmetic: scale = 1 / (dsize / ssize) (it can differ from ssize / dsize in the last bit).
  const sx = 1 / (dw / src.w), sy = 1 / (dh / src.h);
  const ix = Math.round(sx), iy = Math.round(sy);
  if (Math.abs(sx - ix) < Number.EPSILON && Math.abs(sy - iy) < Number.EPSILON) return resizeAreaFast(src, dw, dh, ix, iy);
  const xt = areaTab(src.w, dw, sx), yt = areaTab(src.h, dh, sy);
  const out = new Uint8Array(dw * dh * c);
  // float32 arithmetic in OpenCV's order (ResizeArea_Invoker), so halves round as they do there: every product is
  // rounded to float32, and every sum too (a Float32Array store rounds).
  const acc = new Float32Array(dw * c);
  const row = new Float32Array(dw * c);
  const data = src.data, n = xt.di.length;
  let k = 0;
  for (let dy = 0; dy < dh; dy++) {
    acc.fill(0);
    for (; k < yt.di.length && yt.di[k] === dy; k++) {
      const y = yt.si[k], beta = yt.alpha[k];
      row.fill(0);
      const base = y * src.w * c;
      if (c === 3) {
        for (let t = 0; t < n; t++) {
          const s = base + xt.si[t] * 3, d = xt.di[t] * 3, a = xt.alpha[t];
          row[d] += Math.fround(data[s] * a);
          row[d + 1] += Math.fround(data[s + 1] * a);
          row[d + 2] += Math.fround(data[s + 2] * a);
        }
      } else {
        for (let t = 0; t < n; t++) {
          const s = base + xt.si[t] * c, d = xt.di[t] * c, a = xt.alpha[t];
          for (let ch = 0; ch < c; ch++) row[d + ch] += Math.fround(data[s + ch] * a);
        }
      }
      for (let i = 0; i < acc.length; i++) acc[i] += Math.fround(row[i] * beta);
    }
    const o = dy * dw * c;
    for (let i = 0; i < acc.length; i++) out[o + i] = sat8(acc[i]);
  }
  return image(dw, dh, c, out);
}

// cv::resizeAreaFast: integer factors, the block mean (the 2x2 SIMD path rounds halves up, the others to even).
function resizeAreaFast(src: Image8, dw: number, dh: number, kx: number, ky: number): Image8 {
  const c = src.c;
  const out = new Uint8Array(dw * dh * c);
  const area = kx * ky;
  const scale = Math.fround(1 / area);
  const twoByTwo = kx === 2 && ky === 2;
  for (let dy = 0; dy < dh; dy++) {
    for (let dx = 0; dx < dw; dx++) {
      for (let ch = 0; ch < c; ch++) {
        let sum = 0;
        for (let yy = 0; yy < ky; yy++) {
          const base = ((dy * ky + yy) * src.w + dx * kx) * c + ch;
          for (let xx = 0; xx < kx; xx++) sum += src.data[base + xx * c];
        }
        out[(dy * dw + dx) * c + ch] = twoByTwo ? (sum + 2) >> 2 : sat8(Math.fround(sum * scale));
      }
    }
  }
  return image(dw, dh, c, out);
}

/** cv2.resize(INTER_LINEAR) on 8-bit as OpenCV computes it: 11-bit fixed-point weights from float32 positions,
 *  and the vertical pass of its SIMD kernel (each row >> 4, times the weight, >> 16, summed, rounded >> 2). */
export function resizeLinear(src: Image8, dw: number, dh: number): Image8 {
  const c = src.c;
  // Columns past an edge take the edge pixel with weight 1; rows past an edge keep their fractional weights and
  // read the edge row twice (OpenCV clamps the row index, not the weight), so both edges round as OpenCV does.
  const coefs = (dsize: number, ssize: number, clampWeights: boolean) => {
    const scale = 1 / (dsize / ssize);
    const ofs = new Int32Array(dsize), a0 = new Int32Array(dsize), a1 = new Int32Array(dsize), nxt = new Int32Array(dsize);
    for (let d = 0; d < dsize; d++) {
      let f = Math.fround((d + 0.5) * scale - 0.5);
      let s = Math.floor(f);
      f = Math.fround(f - s);
      if (clampWeights && s < 0) { f = 0; s = 0; }
      if (clampWeights && s >= ssize - 1) { f = 0; s = ssize - 1; }
      ofs[d] = Math.min(Math.max(s, 0), ssize - 1); nxt[d] = Math.min(Math.max(s + 1, 0), ssize - 1);
      a0[d] = sat16(Math.fround(1 - f) * 2048); a1[d] = sat16(f * 2048);
    }
    return { ofs, nxt, a0, a1 };
  };
  const xs = coefs(dw, src.w, true), ys = coefs(dh, src.h, false);
  const row = (y: number) => {
    const out = new Int32Array(dw * c);
    for (let d = 0; d < dw; d++) {
      for (let ch = 0; ch < c; ch++) {
        const p0 = src.data[(y * src.w + xs.ofs[d]) * c + ch], p1 = src.data[(y * src.w + xs.nxt[d]) * c + ch];
        out[d * c + ch] = p0 * xs.a0[d] + p1 * xs.a1[d];
      }
    }
    return out;
  };
  const out = image(dw, dh, c);
  // Each source row's horizontal pass is needed by up to a few consecutive output rows: keep the last two.
  let key0 = -1, key1 = -1, val0 = new Int32Array(0), val1 = new Int32Array(0);
  const cached = (y: number): Int32Array => {
    if (y === key0) return val0;
    if (y === key1) return val1;
    key0 = key1; val0 = val1;
    key1 = y; val1 = row(y);
    return val1;
  };
  for (let d = 0; d < dh; d++) {
    const s0 = cached(ys.ofs[d]), s1 = cached(ys.nxt[d]);
    const b0 = ys.a0[d], b1 = ys.a1[d];
    for (let i = 0; i < dw * c; i++) {
      const v = (((s0[i] >> 4) * b0) >> 16) + (((s1[i] >> 4) * b1) >> 16);
      out.data[d * dw * c + i] = Math.min(255, Math.max(0, (v + 2) >> 2));
    }
  }
  return out;
}

function sat16(x: number): number { return Math.max(-32768, Math.min(32767, pyRound(x))); }

/** cv2.resize with INTER_NEAREST: source index floor(d * scale). */
export function resizeNearest(src: Image8, dw: number, dh: number): Image8 {
  const c = src.c;
  const out = new Uint8Array(dw * dh * c);
  const sx = 1 / (dw / src.w), sy = 1 / (dh / src.h);
  for (let dy = 0; dy < dh; dy++) {
    const y = Math.min(Math.floor(dy * sy), src.h - 1);
    for (let dx = 0; dx < dw; dx++) {
      const x = Math.min(Math.floor(dx * sx), src.w - 1);
      for (let ch = 0; ch < c; ch++) out[(dy * dw + dx) * c + ch] = src.data[(y * src.w + x) * c + ch];
    }
  }
  return image(dw, dh, c, out);
}
