// JSON exactly as Python's json.dumps writes it, for the two byte strings that are hashed or signed:
// - a result's canonical JSON (json.dumps(result.to_dict(), sort_keys=True)): its sha256 is the content hash the
//   server recomputes from the validated result;
// - a manifest's canonical bytes (sort_keys, separators (",", ":"), ensure_ascii): what its Ed25519 signature covers.
// JavaScript numbers lose the int/float distinction Python keeps ("1.0" vs "1"), so: values parsed from the server
// keep their number text (PyNumber), and values made here are written as floats where the schema says float.

/** A number as written in a Python-made JSON text (its repr), kept verbatim. */
export class PyNumber {
  constructor(readonly text: string) {}
  valueOf(): number { return Number(this.text); }
}

/** float.__repr__: the shortest round-trip digits, exponent form below 1e-4 and from 1e16. */
export function pyFloat(x: number): string {
  if (!Number.isFinite(x)) throw new Error(`${x} is not finite; results and manifests hold finite numbers only`);
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, expText] = x.toExponential().split("e");
  const exp = Number(expText);
  const negative = mantissa.startsWith("-");
  const digits = mantissa.replace("-", "").replace(".", "");
  const sign = negative ? "-" : "";
  if (exp < -4 || exp >= 16) {
    const m = digits.length > 1 ? `${digits[0]}.${digits.slice(1)}` : digits;
    return `${sign}${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  if (exp < 0) return `${sign}0.${"0".repeat(-exp - 1)}${digits}`;
  if (digits.length <= exp + 1) return `${sign}${digits}${"0".repeat(exp + 1 - digits.length)}.0`;
  return `${sign}${digits.slice(0, exp + 1)}.${digits.slice(exp + 1)}`;
}

/** json's string encoding with ensure_ascii=True (the default). */
export function pyString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i], code = s.charCodeAt(i);
    if (ch === '"') out += '\\"';
    else if (ch === "\\") out += "\\\\";
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (ch === "\b") out += "\\b";
    else if (ch === "\f") out += "\\f";
    else if (code < 0x20 || code > 0x7e) out += "\\u" + code.toString(16).padStart(4, "0");
    else out += ch;
  }
  return out + '"';
}

export interface DumpOptions {
  compact?: boolean; // separators (",", ":") instead of (", ", ": ")
  floatKeys?: ReadonlySet<string>; // numbers under these keys (and inside their arrays/objects) are floats
}

/** json.dumps(value, sort_keys=True, ...) */
export function pyDumps(value: unknown, options: DumpOptions = {}, inFloat = false): string {
  const item = options.compact ? "," : ", ";
  const colon = options.compact ? ":" : ": ";
  if (value === null || value === undefined) return "null";
  if (value instanceof PyNumber) return value.text;
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value === "number") {
    if (inFloat || !Number.isInteger(value)) return pyFloat(value);
    return String(value);
  }
  if (typeof value === "string") return pyString(value);
  if (Array.isArray(value)) return "[" + value.map((v) => pyDumps(v, options, inFloat)).join(item) + "]";
  if (typeof value === "object") {
    const keys = Object.keys(value as object).sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    return "{" + keys.map((k) => pyString(k) + colon + pyDumps((value as Record<string, unknown>)[k], options,
      inFloat || Boolean(options.floatKeys?.has(k)))).join(item) + "}";
  }
  throw new Error(`cannot write ${typeof value} as JSON`);
}

/** JSON.parse that keeps every number's text (as PyNumber), so Python's canonical form can be rebuilt. */
export function parseKeepingNumbers(text: string): unknown {
  let i = 0;
  const ws = () => { while (i < text.length && " \t\n\r".includes(text[i])) i++; };
  const fail = (what: string): never => { throw new SyntaxError(`invalid JSON at ${i}: ${what}`); };
  const value = (): unknown => {
    ws();
    const ch = text[i];
    if (ch === "{") {
      i++;
      const obj: Record<string, unknown> = {};
      ws();
      if (text[i] === "}") { i++; return obj; }
      for (;;) {
        ws();
        if (text[i] !== '"') fail("expected a key");
        const key = string();
        ws();
        if (text[i++] !== ":") fail("expected ':'");
        obj[key] = value();
        ws();
        if (text[i] === ",") { i++; continue; }
        if (text[i] === "}") { i++; return obj; }
        fail("expected ',' or '}'");
      }
    }
    if (ch === "[") {
      i++;
      const arr: unknown[] = [];
      ws();
      if (text[i] === "]") { i++; return arr; }
      for (;;) {
        arr.push(value());
        ws();
        if (text[i] === ",") { i++; continue; }
        if (text[i] === "]") { i++; return arr; }
        fail("expected ',' or ']'");
      }
    }
    if (ch === '"') return string();
    if (text.startsWith("true", i)) { i += 4; return true; }
    if (text.startsWith("false", i)) { i += 5; return false; }
    if (text.startsWith("null", i)) { i += 4; return null; }
    const m = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?/.exec(text.slice(i, i + 64));
    if (!m) return fail("unexpected character");
    i += m[0].length;
    // Python reads "1e5" as a float and writes it back as 100000.0: normalise non-integers through repr.
    return new PyNumber(/[.eE]/.test(m[0]) ? pyFloat(Number(m[0])) : String(BigInt(m[0])));
  };
  const string = (): string => {
    const start = i;
    i++;
    while (i < text.length && text[i] !== '"') i += text[i] === "\\" ? 2 : 1;
    i++;
    return JSON.parse(text.slice(start, i)) as string;
  };
  const out = value();
  ws();
  if (i !== text.length) fail("trailing characters");
  return out;
}

/** PyNumber values back to plain numbers (for reading a manifest's fields). */
export function plain<T>(value: unknown): T {
  return JSON.parse(JSON.stringify(value, (_k, v) => (v instanceof PyNumber ? Number(v.text) : v))) as T;
}

export type Bytes = Uint8Array<ArrayBuffer>;

export async function sha256Hex(data: Bytes | string): Promise<string> {
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
