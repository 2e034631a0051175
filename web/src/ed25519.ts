// Ed25519 verification: WebCrypto where the browser has it (Chromium 137+), @noble/ed25519 (audited, 5 kB) elsewhere.
import * as noble from "@noble/ed25519";
import type { Bytes } from "./pyjson";

export async function ed25519Verify(publicKey: Bytes, signature: Bytes, message: Bytes): Promise<boolean> {
  try {
    const key = await crypto.subtle.importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
    return await crypto.subtle.verify({ name: "Ed25519" }, key, signature, message);
  } catch (err) {
    if (!(err instanceof DOMException) || err.name !== "NotSupportedError") throw err;
  }
  return noble.verifyAsync(signature, message, publicKey);
}
