// The outbox in IndexedDB: a result is committed (transaction complete) before it is shown, and leaves only when
// the server confirms it, as edge_runtime.outbox does with SQLite. States: pending -> sent -> acknowledged, or
// rejected (kept) when the server refuses it for good.

import type { ScreeningResult } from "./result";

const DB_NAME = "retinaedge";
const DB_VERSION = 1;

export type OutboxState = "pending" | "sent" | "acknowledged" | "rejected";

export interface OutboxRecord {
  result_id: string;
  created_at: number;
  state: OutboxState;
  result: ScreeningResult; // as sent (wire schema)
  canonical: string; // its canonical JSON (Python's json.dumps(sort_keys=True)); content_hash covers it
  content_hash: string;
  overlay_png: Blob | null;
  attempts: number;
  last_error: string | null;
}

export class OutboxError extends Error {}

let opened: Promise<IDBDatabase> | null = null;

export function openDb(): Promise<IDBDatabase> {
  opened ??= new Promise((resolve, reject) => {
    const request = indexedDB.open(DB_NAME, DB_VERSION);
    request.onupgradeneeded = () => {
      const db = request.result;
      const results = db.createObjectStore("results", { keyPath: "result_id" });
      results.createIndex("state", "state");
      db.createObjectStore("settings");
    };
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(new OutboxError(`cannot open the outbox (IndexedDB): ${request.error?.message}`));
  });
  return opened;
}

function done(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(new OutboxError(`outbox write failed: ${tx.error?.message}`));
    tx.onabort = () => reject(new OutboxError(`outbox write aborted: ${tx.error?.message ?? "quota?"}`));
  });
}

function get<T>(request: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(new OutboxError(String(request.error)));
  });
}

/** Store a result; when this resolves the write is durable (strict durability), and only then is it shown. */
export async function put(record: OutboxRecord): Promise<void> {
  const db = await openDb();
  const tx = db.transaction("results", "readwrite", { durability: "strict" });
  tx.objectStore("results").add(record);
  await done(tx);
}

export async function all(): Promise<OutboxRecord[]> {
  const db = await openDb();
  const rows = await get(db.transaction("results").objectStore("results").getAll()) as OutboxRecord[];
  return rows.sort((a, b) => a.created_at - b.created_at);
}

export async function due(limit: number): Promise<OutboxRecord[]> {
  return (await all()).filter((r) => r.state === "pending" || r.state === "sent").slice(0, limit);
}

export async function update(ids: string[], change: (r: OutboxRecord) => void): Promise<void> {
  if (!ids.length) return;
  const db = await openDb();
  const tx = db.transaction("results", "readwrite", { durability: "strict" });
  const store = tx.objectStore("results");
  for (const id of ids) {
    const request = store.get(id);
    request.onsuccess = () => {
      const row = request.result as OutboxRecord | undefined;
      if (row) { change(row); store.put(row); }
    };
  }
  await done(tx);
}

export async function counts(): Promise<Record<OutboxState, number>> {
  const out: Record<OutboxState, number> = { pending: 0, sent: 0, acknowledged: 0, rejected: 0 };
  for (const r of await all()) out[r.state]++;
  return out;
}

export async function getSetting<T>(key: string): Promise<T | undefined> {
  const db = await openDb();
  return await get(db.transaction("settings").objectStore("settings").get(key)) as T | undefined;
}

export async function setSetting(key: string, value: unknown): Promise<void> {
  const db = await openDb();
  const tx = db.transaction("settings", "readwrite", { durability: "strict" });
  tx.objectStore("settings").put(value, key);
  await done(tx);
}
