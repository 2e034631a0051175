// Which model this phone screens with: the fastest artifact (runtime.PREFERENCE) among the server's signed, gated
// releases that this device's runtimes open. Nothing is used before the checks of model.ts; a release that is
// refused or does not open is skipped, with its reason kept for the screen.
import { downloadOffer, Keyring, ModelRefusedError, Offer, offered, ReleaseState, storeModel, VerifiedModel } from "./model";
import { backendFor, ModelSession, PREFERENCE, preferenceRank } from "./runtime";

export const PROBE_RUNS = 3;

export interface Choice {
  session: ModelSession;
  model: VerifiedModel | null; // null: the phone's current model is still the best offer
  offer: Offer;
  skipped: string[]; // why better-ranked formats or releases were not used
}

/** The formats the app could use here, in preference order, and why the others cannot run on this device. */
export function runnableFormats(): { formats: string[]; skipped: string[] } {
  const formats: string[] = [], skipped: string[] = [];
  for (const { format } of PREFERENCE) {
    if (formats.includes(format) || skipped.some((s) => s.startsWith(`${format}:`))) continue;
    const why = backendFor(format).unavailable();
    if (why) skipped.push(`${format}: ${why}`); else formats.push(format);
  }
  return { formats, skipped };
}

/** Choose, download, open and probe; ``current`` is kept when it is already the best offer. Network failures
 *  (TypeError from fetch) propagate: the caller tells "offline" from "refused". */
export async function chooseModel(token: string, keyring: Keyring, releaseOf: (format: string) => Promise<ReleaseState>,
                                  current: ModelSession | null): Promise<Choice> {
  const { formats, skipped } = runnableFormats();
  const offers: Offer[] = [];
  for (const format of formats) {
    try {
      const offer = await offered(token, keyring, format, await releaseOf(format));
      if (offer) offers.push(offer);
    } catch (err) {
      if (err instanceof TypeError) throw err;
      skipped.push(`${format}: ${(err as Error).message}`);
    }
  }
  offers.sort((a, b) => preferenceRank(a.manifest) - preferenceRank(b.manifest));
  for (const offer of offers) {
    if (current && current.manifest.sha256 === offer.manifest.sha256) return { session: current, model: null, offer, skipped };
    try {
      const model = await downloadOffer(offer, token, keyring);
      const session = await ModelSession.open(model.bytes, model.manifest, { probe: PROBE_RUNS });
      await storeModel(model);
      return { session, model, offer, skipped };
    } catch (err) {
      if (err instanceof TypeError) throw err;
      skipped.push(`${offer.format} ${offer.manifest.quantization.precision}: ${(err as Error).message}`);
    }
  }
  throw new ModelRefusedError(skipped.length ? skipped.join("; ") : "the server has no model for this app");
}
