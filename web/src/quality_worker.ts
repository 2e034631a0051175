// The quality gate in a Web Worker: the step runs it while the main thread preprocesses, runs the model and
// renders the CAM (a WASM runtime computes on the thread that calls it), so the gate's time overlaps theirs.
// The photo arrives as a copy; the verdict is quality.assess's, unchanged.
/// <reference lib="webworker" />
import type { Image8 } from "./image";
import type { FieldOfView } from "./preprocess";
import { assess } from "./quality";

export interface QualityRequest { id: number; bgr: Image8; fov: FieldOfView | null }

const scope = self as unknown as DedicatedWorkerGlobalScope;
scope.onmessage = (event: MessageEvent<QualityRequest>) => {
  const { id, bgr, fov } = event.data;
  const started = performance.now();
  try {
    scope.postMessage({ id, report: assess(bgr, fov), ms: performance.now() - started });
  } catch (err) {
    scope.postMessage({ id, error: String((err as Error)?.stack ?? err) });
  }
};
