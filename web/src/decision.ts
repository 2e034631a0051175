// The port of edge_runtime/decision.py: logits + CAM + the manifest's operating point -> a Decision.
import { CONTRACT, OperatingPoint } from "./contract";

export function softmax(logits: ArrayLike<number>, temperature = 1): number[] {
  const z = Array.from(logits, (v) => v / temperature);
  const top = Math.max(...z);
  const e = z.map((v) => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

export function sigmoid(logit: number, temperature = 1): number {
  const z = logit / temperature;
  const e = Math.exp(-Math.abs(z));
  return z >= 0 ? 1 / (1 + e) : e / (1 + e);
}

/** Python's round(x, 6) for the stored probabilities (ties cannot occur for these doubles in practice). */
export function round6(x: number): number {
  return Number(x.toFixed(6));
}

export interface Cam { grid: Float32Array; h: number; w: number }

export interface DmeDecision { probability: number; present: boolean; threshold: number; cam: Cam | null; camPeak: [number, number] | null }

export interface Decision {
  probabilities: number[]; // rounded to 6 decimals, as stored
  grade: number;
  confidence: number;
  referableProbability: number;
  referable: boolean;
  drReferable: boolean;
  uncertain: boolean;
  threshold: number;
  cam: Cam | null; // the grade's map after ReLU, 0..1
  camPeak: [number, number] | null;
  dme: DmeDecision | null;
  outcome: "graded" | "uncertain";
}

/** normalise_cam: ReLU, then divide by the maximum. */
export function normaliseCam(values: ArrayLike<number>, h: number, w: number): Cam {
  const grid = Float32Array.from(values, (v) => Math.max(v, 0));
  let peak = 0;
  for (const v of grid) if (v > peak) peak = v;
  if (peak > 0) for (let i = 0; i < grid.length; i++) grid[i] = Math.fround(grid[i] / peak);
  return { grid, h, w };
}

/** cam_grid_peak: centre of the first maximal cell, normalised 0..1. */
export function camGridPeak(cam: Cam): [number, number] {
  let best = 0;
  for (let i = 1; i < cam.grid.length; i++) if (cam.grid[i] > cam.grid[best]) best = i;
  const row = Math.floor(best / cam.w), col = best % cam.w;
  return [(col + 0.5) / cam.w, (row + 0.5) / cam.h];
}

/** consistent_grades: the most probable grade on the referral decision's side (2-4 when referred for DR, 0-1 when
 *  not; ties to the lower grade), so the grade shown never contradicts the referral. */
export function consistentGrade(probs: number[], drReferable: boolean): number {
  const low = drReferable ? CONTRACT.referable_min_grade : 0;
  const high = drReferable ? probs.length : CONTRACT.referable_min_grade;
  let grade = low;
  for (let g = low + 1; g < high; g++) if (probs[g] > probs[grade]) grade = g;
  return grade;
}

function inBand(score: number, point: OperatingPoint): boolean {
  if (!point.uncertain_band) return false;
  const [low, high] = point.uncertain_band;
  return score >= low && score < high;
}

/** decide(): ``camAll`` is the (5, h, w) cam output of one photo (or null). */
export function decide(logits: ArrayLike<number>, camAll: Float32Array | null, camShape: [number, number] | null,
                       point: OperatingPoint, dmeLogit: number | null = null, dmeCam: Float32Array | null = null,
                       dmePoint: OperatingPoint | null = null): Decision {
  if ((dmeLogit === null) !== (dmePoint === null)) throw new Error("DME logit and the DME operating point come together");
  const probs = softmax(logits, point.temperature);
  const score = probs.slice(CONTRACT.referable_min_grade).reduce((a, b) => a + b, 0);
  const drReferable = score >= point.threshold;
  const grade = consistentGrade(probs, drReferable);
  let cam: Cam | null = null;
  if (camAll && camShape) {
    const [h, w] = camShape;
    cam = normaliseCam(camAll.subarray(grade * h * w, (grade + 1) * h * w), h, w);
  }
  let dme: DmeDecision | null = null;
  if (dmeLogit !== null && dmePoint) {
    const probability = sigmoid(dmeLogit, dmePoint.temperature);
    const dCam = dmeCam && camShape ? normaliseCam(dmeCam.subarray(0, camShape[0] * camShape[1]), camShape[0], camShape[1]) : null;
    dme = { probability, present: probability >= dmePoint.threshold, threshold: dmePoint.threshold, cam: dCam,
            camPeak: dCam ? camGridPeak(dCam) : null };
  }
  const uncertain = inBand(score, point);
  return {
    probabilities: probs.map(round6), grade, confidence: round6(probs[grade]), referableProbability: score,
    referable: drReferable || Boolean(dme?.present), drReferable, uncertain, threshold: point.threshold,
    cam, camPeak: cam ? camGridPeak(cam) : null, dme, outcome: uncertain ? "uncertain" : "graded",
  };
}

/** referral_reason of edge_runtime.decision / wire.result_referral_reason. */
export function referralReason(outcome: string, drReferable: boolean | null, dmePresent: boolean | null): string | null {
  if (outcome === "ungradable") return "ungradable";
  const reasons = [...(drReferable ? ["referable DR"] : []), ...(dmePresent ? ["DME present"] : [])];
  const reason = reasons.join(" and ") || null;
  if (outcome === "uncertain") return ["uncertain (second read)", reason].filter(Boolean).join("; ");
  return reason;
}
