// The manifest fields the web app reads, and the constants it shares with edge_runtime. The constants come from
// Python (web/src/contract.generated.json, written by web/fixtures/make_fixtures.py and checked by the tests), so
// the disclaimer, grade names, outcome texts and the quality gate's rules have one source.
import generated from "./contract.generated.json";

export interface PreprocessPolicy {
  input_size: number;
  color_order: "RGB" | "BGR";
  mean: [number, number, number];
  std: [number, number, number];
  crop_to_fundus: boolean;
  fov_threshold: number;
  ben_graham: boolean;
  ben_graham_sigma_fraction: number;
  resize_interpolation: string;
  layout: "NCHW" | "NHWC";
}

export interface OperatingPoint {
  threshold: number;
  temperature: number;
  uncertain_band: [number, number] | null;
  rule: string;
}

export interface Manifest {
  model_name: string;
  model_version: string;
  format: string;
  preprocess: PreprocessPolicy;
  output_names: string[];
  cam_shape: [number, number] | null;
  operating_point: OperatingPoint;
  heads: string[];
  dme_operating_point: OperatingPoint | null;
  quantization: { precision: string };
  gate: { status: string; failures: string[] };
  sha256: string | null;
  signature: { algorithm: string; key_id: string; value: string } | null;
  [key: string]: unknown;
}

export interface QualityRule { metric: string; limit: string; op: ">=" | "<="; reason: string }

export const CONTRACT = generated as unknown as {
  disclaimer: string;
  grade_names: string[];
  referable_min_grade: number;
  ready_gate_statuses: string[];
  heads: Record<string, { outputs: [string, string]; classes: number }>;
  outcome_text: { ungradable: string; uncertain: string; refer: string; no_referral: string };
  quality: {
    rules: QualityRule[]; thresholds: Record<string, number>; work_size: number; gate_side: number;
    not_fundus: { text: string; max_fov_fraction: number; min_roundness: number; min_mean_for_arc: number; min_field_range: number;
                  max_field_hole: number | null };
    arc: { tolerance: number; straight_edge: number; min_points: number; samples: [number, number, number][] };
    learned: null | {
      name: string; features: string[]; log_features: string[]; mean: number[]; scale: number[]; coef: number[];
      intercept: number; log_offset: number; operating_point: { threshold: number; temperature: number };
    };
  };
};

/** ArtifactManifest.ready: screening only with a passed (or, for FP32, not required) fidelity gate. */
export function manifestReady(m: Manifest): boolean {
  return CONTRACT.ready_gate_statuses.includes(m.gate?.status);
}
