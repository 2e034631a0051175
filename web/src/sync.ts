// Drains the outbox to POST /v1/sync, the contract edge_runtime.sync implements: batches, idempotent result ids,
// only "stored"/"duplicate" acknowledge, "conflict"/"rejected" are kept as rejected, everything else stays due.
// Failures back off exponentially with jitter; a 429's Retry-After is honoured.
import * as outbox from "./outbox";

const BATCH = 25;
const BASE_DELAY_S = 2;
const MAX_DELAY_S = 300;

export interface SyncReport { sent: number; acknowledged: number; rejected: number; error: string | null }

async function b64(blob: Blob | null): Promise<string | null> {
  if (!blob) return null;
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

export class RetryLater extends Error { constructor(readonly seconds: number, message: string) { super(message); } }

/** One batch; returns how many results it held (0: drained). */
export async function pushBatch(token: string): Promise<{ sent: number; acked: number; rejected: number }> {
  const items = await outbox.due(BATCH);
  if (!items.length) return { sent: 0, acked: 0, rejected: 0 };
  const ids = items.map((r) => r.result_id);
  await outbox.update(ids, (r) => { r.state = r.state === "pending" ? "sent" : r.state; r.attempts++; });
  // The canonical text is sent as the result itself: the server re-validates it and recomputes the same hash.
  const body = `{"results": [${(await Promise.all(items.map(async (r) =>
    `{"result": ${r.canonical}, "content_hash": "${r.content_hash}", "overlay_png_b64": ${JSON.stringify(await b64(r.overlay_png))}}`))).join(", ")}]}`;
  let response: Response;
  try {
    response = await fetch("/v1/sync", { method: "POST", body, cache: "no-store",
                                        headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" } });
  } catch (err) {
    await outbox.update(ids, (r) => { r.last_error = `network: ${err}`; });
    throw new RetryLater(0, `network error: ${err}`);
  }
  if (response.status === 429) {
    const wait = Math.min(3600, Math.max(0, Number(response.headers.get("Retry-After") ?? "5") || 5));
    throw new RetryLater(wait, "the server asked to slow down");
  }
  if (response.status === 401 || response.status === 403) throw new Error(`the server refused the device token (${response.status}); ask for a new one`);
  let entries: { result_id?: unknown; status?: unknown; detail?: unknown }[];
  try {
    const parsed = await response.json();
    if (response.status !== 200 || !Array.isArray(parsed?.items)) throw new Error("not the sync protocol");
    entries = parsed.items;
  } catch {
    await outbox.update(ids, (r) => { r.last_error = `HTTP ${response.status}, not the sync protocol`; });
    throw new RetryLater(0, `the server answered HTTP ${response.status} outside the sync protocol (a captive portal?)`);
  }
  const acked: string[] = [], refused = new Map<string, string>();
  for (const e of entries) {
    if (typeof e?.result_id !== "string" || !ids.includes(e.result_id)) continue; // only what this batch sent
    if (e.status === "stored" || e.status === "duplicate") acked.push(e.result_id);
    else if (e.status === "conflict" || e.status === "rejected") refused.set(e.result_id, `${e.status}: ${String(e.detail ?? "").slice(0, 300)}`);
  }
  await outbox.update(acked, (r) => { r.state = "acknowledged"; r.last_error = null; });
  await outbox.update([...refused.keys()], (r) => { r.state = "rejected"; r.last_error = refused.get(r.result_id)!; });
  if (!acked.length && !refused.size) throw new RetryLater(0, `the server settled none of ${ids.length} result(s)`);
  return { sent: items.length, acked: acked.length, rejected: refused.size };
}

/** Push until drained; on failure, wait (exponential backoff with jitter, or Retry-After) and try again. */
export class SyncLoop {
  private failures = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private running = false;
  last: SyncReport = { sent: 0, acknowledged: 0, rejected: 0, error: null };

  constructor(private readonly token: () => Promise<string | undefined>, private readonly onChange: () => void) {}

  /** Sync now (cancels a scheduled retry); resolves when drained or after one failed round. */
  async run(): Promise<SyncReport> {
    if (this.running) return this.last;
    if (this.timer) { clearTimeout(this.timer); this.timer = null; }
    this.running = true;
    const report: SyncReport = { sent: 0, acknowledged: 0, rejected: 0, error: null };
    try {
      const token = await this.token();
      if (!token) throw new Error("no device token yet");
      for (;;) {
        const round = await pushBatch(token);
        report.sent += round.sent; report.acknowledged += round.acked; report.rejected += round.rejected;
        if (!round.sent) break;
      }
      this.failures = 0;
    } catch (err) {
      report.error = String((err as Error).message ?? err);
      this.failures++;
      const wait = err instanceof RetryLater && err.seconds > 0 ? err.seconds
        : Math.min(MAX_DELAY_S, BASE_DELAY_S * 2 ** Math.min(this.failures, 16)) * (0.5 + Math.random());
      if (navigator.onLine) this.timer = setTimeout(() => void this.run(), wait * 1000);
    } finally {
      this.running = false;
      this.last = report;
      this.onChange();
    }
    return report;
  }
}
