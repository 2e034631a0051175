// The screening result in the wire schema (edge_runtime.wire.ScreeningResult.to_dict), its canonical JSON and
// content hash, and the per-visit rule (wire.encounter_decision).
import { CONTRACT } from "./contract";
import { pyDumps, sha256Hex } from "./pyjson";

// Fields the wire schema types as float: Python writes 1.0 where JavaScript would write 1.
export const FLOAT_KEYS: ReadonlySet<string> = new Set([
  "score", "metrics", "probabilities", "confidence", "referable_probability", "threshold", "cam_peak",
  "dme_probability", "dme_threshold", "dme_cam_peak", "latency_ms",
]);

export interface QualityReport { gradable: boolean; score: number; reasons: string[]; metrics: Record<string, number> }

export interface ScreeningResult {
  device_id: string; model_version: string; model_sha256: string; backend: string; provider: string;
  quality: QualityReport;
  grade: number | null; probabilities: number[] | null; confidence: number | null; referable: boolean | null;
  outcome: "graded" | "uncertain" | "ungradable";
  referable_probability: number | null; threshold: number | null; cam_peak: [number, number] | null;
  dme_probability?: number; dme_present?: boolean; dme_threshold?: number; dme_cam_peak?: [number, number] | null;
  latency_ms: Record<string, number>;
  result_id: string; captured_at: string; image_name: string | null; encounter_id: string | null;
  eye: "left" | "right" | null; disclaimer: string; grade_name: string | null;
}

/** datetime.isoformat() of a UTC time: microseconds only when non-zero, "+00:00". */
export function pyIsoNow(date = new Date()): string {
  const iso = date.toISOString(); // 2026-12-07T12:00:00.123Z
  const ms = date.getUTCMilliseconds();
  return iso.slice(0, 19) + (ms ? `.${String(ms * 1000).padStart(6, "0")}` : "") + "+00:00";
}

export function newResult(fields: Omit<ScreeningResult, "result_id" | "captured_at" | "disclaimer" | "grade_name">): ScreeningResult {
  return {
    ...fields, result_id: crypto.randomUUID(), captured_at: pyIsoNow(), disclaimer: CONTRACT.disclaimer,
    grade_name: fields.grade === null ? null : CONTRACT.grade_names[fields.grade],
  };
}

/** ScreeningResult.canonical_json(): json.dumps(to_dict(), sort_keys=True). */
export function canonicalJson(result: ScreeningResult): string {
  return pyDumps(result, { floatKeys: FLOAT_KEYS });
}

export async function contentHash(canonical: string): Promise<string> {
  return sha256Hex(canonical);
}

export interface EncounterDecision { decision: "refer" | "no_referral" | "incomplete"; reason: string; eyes: Record<string, ScreeningResult> }

// The per-visit rule of edge_runtime.wire.encounter_decision.
const refers = (r: ScreeningResult) => r.outcome === "uncertain" || (r.outcome === "graded" && Boolean(r.referable));

function state(r: ScreeningResult): string {
  if (r.outcome === "ungradable") return "ungradable";
  if (r.outcome === "uncertain") return "uncertain (second read)";
  return "referable" + (r.dme_present ? " (DME present)" : "");
}

// _shown_key: referable before uncertain, then the higher grade, then the later capture, then result_id.
function shownKey(r: ScreeningResult): (number | string)[] {
  return [r.outcome === "graded" && r.referable ? 1 : 0, r.grade ?? 0, Date.parse(r.captured_at), r.result_id];
}

function compareKeys(a: (number | string)[], b: (number | string)[]): number {
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] < b[i] ? -1 : 1;
  return 0;
}

const maxBy = (rs: ScreeningResult[], key: (r: ScreeningResult) => (number | string)[]) =>
  rs.reduce((best, r) => (compareKeys(key(r), key(best)) > 0 ? r : best));

/** encounter_decision: refer if any gradable capture of either eye is referable or uncertain, or an eye has only
 *  ungradable captures; a capture of unknown eye refers when it is referable, uncertain or ungradable. Every
 *  gradable capture counts (a later clean retake never cancels a referable one); one eye missing and nothing
 *  referred is "incomplete", never a clean negative. */
export function encounterDecision(results: ScreeningResult[]): EncounterDecision {
  const byEye: Record<string, ScreeningResult[]> = { left: [], right: [], unknown: [] };
  const ordered = [...results].sort((a, b) => compareKeys([Date.parse(a.captured_at), a.result_id], [Date.parse(b.captured_at), b.result_id]));
  for (const r of ordered) byEye[r.eye === "left" || r.eye === "right" ? r.eye : "unknown"].push(r);
  const chosen: Record<string, ScreeningResult> = {};
  const reasons: string[] = [];
  for (const eye of ["left", "right"]) {
    const captures = byEye[eye];
    if (!captures.length) continue;
    const gradable = captures.filter((r) => r.outcome !== "ungradable");
    const referred = gradable.filter(refers);
    chosen[eye] = referred.length ? maxBy(referred, shownKey) : (gradable.length ? gradable : captures).at(-1)!;
    if (referred.length || !gradable.length) reasons.push(`${eye} eye ${state(chosen[eye])}` + (referred.length ? "" : " after retakes"));
  }
  const unknown = byEye.unknown.filter((r) => r.outcome === "ungradable" || refers(r));
  if (unknown.length) {
    const worst = maxBy(unknown, (r) => [refers(r) ? 1 : 0, ...shownKey(r)]);
    const count = unknown.length > 1 ? `${unknown.length} captures of unknown eye, the worst` : "a capture of unknown eye";
    reasons.push(`${count} ${state(worst)}`);
  }
  if (reasons.length) return { decision: "refer", reason: reasons.join("; "), eyes: chosen };
  const missing = ["left", "right"].filter((e) => !chosen[e]);
  if (missing.length) return { decision: "incomplete", reason: `no gradable photo of the ${missing.join(" and ")} eye yet`, eyes: chosen };
  return { decision: "no_referral", reason: "both eyes gradable and not referable", eyes: chosen };
}
