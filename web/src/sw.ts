// Service worker: after one online visit the app shell and the runtime are served from Cache Storage, so the app
// starts with no network. The verified model and its manifest live in their own cache (model.ts writes them only
// after the signature, gate and sha256 checks). API calls (/v1/...) always go to the network.
/// <reference lib="webworker" />
declare const __PRECACHE__: string[];
declare const __VERSION__: string;

const sw = globalThis as unknown as ServiceWorkerGlobalScope;
const SHELL = `retinaedge-shell-${__VERSION__}`;
const MODEL_CACHE = "retinaedge-model-v1";

sw.addEventListener("install", (event: ExtendableEvent) => {
  event.waitUntil((async () => {
    const cache = await caches.open(SHELL);
    await cache.addAll(__PRECACHE__.map((path) => new Request(path, { cache: "reload" })));
    await sw.skipWaiting();
  })());
});

sw.addEventListener("activate", (event: ExtendableEvent) => {
  event.waitUntil((async () => {
    for (const name of await caches.keys()) if (name.startsWith("retinaedge-shell-") && name !== SHELL) await caches.delete(name);
    await sw.clients.claim();
  })());
});

sw.addEventListener("fetch", (event: FetchEvent) => {
  const url = new URL(event.request.url);
  const scope = new URL(sw.registration.scope);
  if (event.request.method !== "GET" || url.origin !== scope.origin || !url.pathname.startsWith(scope.pathname)) return;
  const path = url.pathname.slice(scope.pathname.length);
  if (path === "config.json" || path.startsWith("api/")) return; // live answers only
  event.respondWith((async () => {
    const key = path === "" || path === "index.html" ? "./" : path; // the shell is cached under the scope URL
    const hit = (await caches.match(new URL(key, scope).href, { cacheName: SHELL, ignoreSearch: true }))
      ?? (await caches.match(event.request, { cacheName: MODEL_CACHE }));
    if (hit) return hit;
    return fetch(event.request);
  })());
});
