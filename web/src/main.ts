// The screening app: setup (device token, pinned publisher key, verified model), the visit flow for both eyes,
// results from the outbox, and background sync. Every result is committed to the outbox before it is shown.
import { CONTRACT } from "./contract";
import { referralReason } from "./decision";
import { chooseModel, PROBE_RUNS } from "./choose";
import { Keyring, ReleaseState, storedModel } from "./model";
import * as outbox from "./outbox";
import { encounterDecision, ScreeningResult } from "./result";
import { ModelSession } from "./runtime";
import "./runtime_litert";
import "./runtime_ort";
import { bitmapToBgr, decodeBlob, decodeSide, screen, Screening, Visit } from "./screen";
import { SyncLoop } from "./sync";

const $ = <T extends HTMLElement = HTMLElement>(id: string) => document.getElementById(id) as T;
const show = (id: string, on: boolean) => { $(id).hidden = !on; };

const state = {
  session: null as ModelSession | null,
  deviceId: "",
  visit: { encounterId: null, eye: "right" } as Visit,
  stream: null as MediaStream | null,
};

const sync = new SyncLoop(() => outbox.getSetting<string>("token"), () => void refreshCounts());

async function refreshCounts(): Promise<void> {
  const c = await outbox.counts();
  const waiting = c.pending + c.sent;
  $("pending").textContent = `${waiting} to sync`;
  $("pending").dataset.count = String(waiting);
  $("net").textContent = navigator.onLine ? "online" : "offline";
}

function newVisitId(): string {
  const d = new Date();
  return `visit-${d.toISOString().slice(0, 10).replace(/-/g, "")}-${crypto.randomUUID().slice(0, 6)}`;
}

function setEye(eye: "left" | "right"): void {
  state.visit = { ...state.visit, eye };
  $("eye-left").setAttribute("aria-checked", String(eye === "left"));
  $("eye-right").setAttribute("aria-checked", String(eye === "right"));
}

function actionText(r: ScreeningResult): { text: string; css: string } {
  const t = CONTRACT.outcome_text;
  if (r.outcome === "ungradable") return { text: t.ungradable, css: "ungradable" };
  if (r.outcome === "uncertain") return { text: t.uncertain, css: "uncertain" };
  if (r.referable) {
    const drReferable = r.referable_probability !== null && r.threshold !== null && r.referable_probability >= r.threshold;
    return { text: `${t.refer} (${referralReason(r.outcome, drReferable, r.dme_present ?? null)})`, css: "refer" };
  }
  return { text: t.no_referral, css: "no_referral" };
}

function showResult(s: Screening): void {
  const r = s.result;
  const { text, css } = actionText(r);
  $("outcome").textContent = text;
  $("outcome").className = `banner ${css}`;
  $("outcome").dataset.outcome = r.outcome;
  const reasons = $("reasons");
  reasons.replaceChildren(...(r.outcome === "ungradable" ? r.quality.reasons : []).map((reason) => {
    const li = document.createElement("li");
    li.textContent = reason; // each reason carries its advice ("...: hold still and refocus")
    return li;
  }));
  $("finding").textContent = r.outcome === "ungradable"
    ? `Retake the ${r.eye ?? ""} eye photo: the image is not good enough to grade.`
    : `${r.eye ? r.eye + " eye: " : ""}grade ${r.grade} (${r.grade_name}), P(referable) ${r.referable_probability?.toFixed(2)} at threshold ${r.threshold?.toFixed(2)}` +
      (r.dme_probability !== undefined ? `, P(DME) ${r.dme_probability.toFixed(2)}` : "");
  const img = $<HTMLImageElement>("overlay");
  if (s.overlay) { img.src = URL.createObjectURL(s.overlay); img.hidden = false; } else img.hidden = true;
  $("model-line").textContent = `model ${r.model_version}, ${r.backend}/${r.provider}, ` +
    `${Math.round(r.latency_ms.total ?? 0)} ms; saved on this phone`;
  show("result", true);
  show("retake", r.outcome === "ungradable");
}

async function showEncounter(): Promise<void> {
  const id = state.visit.encounterId;
  if (!id) { show("encounter-card", false); return; }
  const results = (await outbox.all()).map((row) => row.result).filter((r) => r.encounter_id === id);
  if (!results.length) { show("encounter-card", false); return; }
  const d = encounterDecision(results);
  const label = { refer: "REFER", no_referral: "no referral", incomplete: "INCOMPLETE" }[d.decision];
  $("encounter-decision").textContent = `${label}: ${d.reason}`;
  $("encounter-decision").className = `banner ${d.decision}`;
  $("encounter-decision").dataset.decision = d.decision;
  $("encounter-eyes").replaceChildren(...(["right", "left"] as const).map((eye) => {
    const li = document.createElement("li");
    const r = d.eyes[eye];
    li.textContent = `${eye}: ${r ? actionText(r).text : "not yet photographed"}`;
    return li;
  }));
  show("encounter-card", true);
}

async function run(blobOrFrame: () => Promise<ReturnType<typeof bitmapToBgr>>, name: string | null): Promise<void> {
  if (!state.session) return;
  $("screen-error").textContent = "";
  show("busy", true);
  try {
    const started = performance.now();
    const bgr = await blobOrFrame();
    const decodeMs = Math.round((performance.now() - started) * 1000) / 1000;
    state.visit.encounterId = ($<HTMLInputElement>("encounter").value.trim()) || null;
    const s = await screen(bgr, state.session, state.deviceId, state.visit, name, decodeMs);
    showResult(s);
    document.body.dataset.screened = String(Number(document.body.dataset.screened ?? 0) + 1);
    await showEncounter();
    if (s.result.outcome !== "ungradable" && state.visit.eye === "right") setEye("left");
    await refreshCounts();
    if (navigator.onLine) void sync.run();
  } catch (err) {
    $("screen-error").textContent = `Not screened: ${(err as Error).message}`;
  } finally {
    show("busy", false);
  }
}

async function startCamera(): Promise<void> {
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: { ideal: "environment" }, width: { ideal: 1920 }, height: { ideal: 1080 } }, audio: false });
  } catch (err) {
    $("screen-error").textContent = `Camera unavailable (${(err as Error).name}); use "Photo file" instead.`;
    return;
  }
  const video = $<HTMLVideoElement>("video");
  video.srcObject = state.stream;
  await video.play();
  show("camera-view", true); show("camera", false); show("capture", true);
}

function stopCamera(): void {
  state.stream?.getTracks().forEach((t) => t.stop());
  state.stream = null;
  $<HTMLVideoElement>("video").srcObject = null;
  show("camera-view", false); show("capture", false); show("camera", true);
}

async function openModel(model: Awaited<ReturnType<typeof storedModel>>): Promise<void> {
  if (!model) return;
  state.session = await ModelSession.open(model.bytes, model.manifest, { probe: PROBE_RUNS });
  $("model-error").textContent = "";
}

const NO_RELEASE: ReleaseState = { sequence: -1, min_sequence: 0, sha256: null };

// Releases are numbered per format on the server; an app that ran only ONNX kept one "release" setting.
const releaseOf = async (format: string): Promise<ReleaseState> =>
  (await outbox.getSetting<ReleaseState>(`release:${format}`))
  ?? (format === "onnx" ? await outbox.getSetting<ReleaseState>("release") : undefined) ?? NO_RELEASE;

/** Choose the fastest signed, gated model this phone runs (choose.ts), switch to it and record its release. */
async function fetchModel(token: string, key: Keyring): Promise<string[]> {
  const choice = await chooseModel(token, key, releaseOf, state.session);
  const format = choice.offer.format, before = await releaseOf(format);
  await outbox.setSetting(`release:${format}`, {
    sequence: choice.offer.release.sequence, sha256: choice.offer.manifest.sha256,
    min_sequence: Math.max(before.min_sequence, choice.offer.release.min_sequence) });
  state.session = choice.session;
  return choice.skipped;
}

async function refreshModel(token: string, key: Keyring): Promise<void> {
  try {
    const skipped = await fetchModel(token, key);
    $("model-error").textContent = "";
    showModel(skipped);
  } catch (err) {
    const offline = err instanceof TypeError; // fetch's network failure: no server, not a refused model
    $("model-error").textContent = (offline ? "Offline: no model update check" : `Model update refused: ${(err as Error).message}`) +
      (state.session ? " (screening with the verified model already on this phone)" : "");
  }
}

/** Which model and runtime screen here, and why better-ranked ones were not used. */
function showModel(skipped: string[] = []): void {
  const s = state.session;
  if (!s) return;
  $("runtime-line").textContent = `model ${s.manifest.model_version} (${s.manifest.format} ${s.manifest.quantization.precision}) on ` +
    `${s.info.backend}, ${s.info.threads} thread${s.info.threads === 1 ? "" : "s"}` +
    (s.info.probeMs !== undefined ? `, ${s.info.probeMs} ms an inference` : "") + (skipped.length ? `; not used: ${skipped.join("; ")}` : "");
  document.body.dataset.backend = s.info.backend;
  document.body.dataset.artifact = `${s.manifest.format}-${s.manifest.quantization.precision}`;
}

function showVisit(): void {
  show("setup", false); show("install", false);
  show("visit", true); show("pick", true); show("camera", true); show("sync", true);
  if (!$<HTMLInputElement>("encounter").value) $<HTMLInputElement>("encounter").value = newVisitId();
}

async function install(): Promise<void> {
  const token = $<HTMLInputElement>("token").value.trim();
  $("setup-error").textContent = "";
  try {
    const config = await (await fetch("config.json", { cache: "no-store" })).json();
    const keyring: Keyring = { keys: config.keys ?? {}, revoked: config.revoked ?? [] };
    if (!Object.keys(keyring.keys).length) throw new Error("this server names no model publisher key; ask the administrator");
    const me = await fetch("api/device", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
    if (!me.ok) throw new Error(me.status === 401 || me.status === 403 ? "the token was refused; check it" : `server answered ${me.status}`);
    const device = await me.json();
    await outbox.setSetting("trusted_keys", keyring); // pinned: a later visit never replaces it
    const skipped = await fetchModel(token, keyring);
    await outbox.setSetting("token", token);
    await outbox.setSetting("device_id", device.device_id);
    state.deviceId = device.device_id;
    showModel(skipped);
    showVisit();
    document.body.dataset.ready = "screening";
  } catch (err) {
    $("setup-error").textContent = (err as Error).message;
  }
}

async function main(): Promise<void> {
  $("disclaimer").textContent = CONTRACT.disclaimer;
  for (const el of document.querySelectorAll(".result-disclaimer")) el.textContent = CONTRACT.disclaimer;
  if ("serviceWorker" in navigator) {
    navigator.serviceWorker.register("sw.js", { scope: "./" }).catch((err) => console.warn("service worker", err));
  }
  $("eye-left").onclick = () => setEye("left");
  $("eye-right").onclick = () => setEye("right");
  $("new-visit").onclick = () => {
    $<HTMLInputElement>("encounter").value = newVisitId();
    setEye("right"); show("result", false); void showEncounter();
  };
  $("pick").onclick = () => $<HTMLInputElement>("file").click();
  $("file").onchange = () => {
    const input = $<HTMLInputElement>("file");
    const file = input.files?.[0];
    input.value = "";
    if (file) void run(() => decodeBlob(file, decodeSide(state.session!.manifest.preprocess)), file.name);
  };
  $("camera").onclick = () => void startCamera();
  $("capture").onclick = () => {
    const video = $<HTMLVideoElement>("video");
    void run(async () => { const bgr = bitmapToBgr(video, video.videoWidth, video.videoHeight); stopCamera(); return bgr; }, null);
  };
  $("retake").onclick = () => { show("result", false); show("retake", false); void startCamera(); };
  $("sync").onclick = () => void sync.run();
  $("install").onclick = () => void install();
  addEventListener("online", () => { void refreshCounts(); void sync.run(); });
  addEventListener("offline", () => void refreshCounts());
  setEye("right");
  await refreshCounts();

  const token = await outbox.getSetting<string>("token");
  const key = await outbox.getSetting<Keyring>("trusted_keys");
  if (!token || !key) {
    show("setup", true); show("install", true);
    document.body.dataset.ready = "setup";
    return;
  }
  state.deviceId = (await outbox.getSetting<string>("device_id")) ?? "";
  try {
    await openModel(await storedModel(key));
    showModel();
  } catch (err) {
    $("model-error").textContent = `The stored model failed its checks: ${(err as Error).message}`;
  }
  showVisit();
  if (navigator.onLine) { await refreshModel(token, key); void sync.run(); }
  document.body.dataset.ready = state.session ? "screening" : "no-model";
}

void main();
