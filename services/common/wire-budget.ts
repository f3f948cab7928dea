/**
 * How many values a request would decode into, counted on its wire bytes before the generated
 * decoder runs. The decoder makes one JavaScript object per embedded message and one array entry
 * per repeated value; a message of a few bytes each (an empty `items` entry is 2 bytes, a packed
 * varint 1) near the transport's limit would build tens of millions of them synchronously and
 * abort the process on V8's heap or array limits, before any handler could check a count. The
 * scan walks the message with the schema's descriptors (proto/gen/freekv/v1/descriptors.ts,
 * written by `npm run gen:proto`): embedded messages are entered, packed repeated fields are
 * counted without being decoded, strings and bytes are skipped whole. It allocates nothing and
 * stops at the first limit passed; what does not parse is left to the decoder, which rejects it.
 */
import { createFileRegistry, fromBinary, ScalarType, type DescField, type DescMessage } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";
import { FILE_DESCRIPTOR_SET } from "../../proto/gen/freekv/v1/descriptors.js";

export interface WireLimits {
  /** Embedded messages (each decodes into an object). */
  maxMessages: number;
  /** Fields and repeated values in all (each decodes into a property or an array entry). */
  maxValues: number;
}

let registry: ReturnType<typeof createFileRegistry> | undefined;

/** The request message of the method at `path` ("/freekv.v1.ComputeService/Attention"), if the schema has it. */
export function requestMessage(path: string): DescMessage | undefined {
  registry ??= createFileRegistry(fromBinary(FileDescriptorSetSchema, Buffer.from(FILE_DESCRIPTOR_SET, "base64")));
  const m = /^\/([^/]+)\/([^/]+)$/.exec(path);
  if (!m) return undefined;
  return registry.getService(m[1])?.methods.find((x) => x.name === m[2])?.input;
}

const fieldsByNumber = new WeakMap<DescMessage, Map<number, DescField>>();

function fieldOf(desc: DescMessage, no: number): DescField | undefined {
  let m = fieldsByNumber.get(desc);
  if (!m) fieldsByNumber.set(desc, (m = new Map(desc.fields.map((f) => [f.number, f]))));
  return m.get(no);
}

const FIXED32 = new Set([ScalarType.FIXED32, ScalarType.SFIXED32, ScalarType.FLOAT]);
const FIXED64 = new Set([ScalarType.FIXED64, ScalarType.SFIXED64, ScalarType.DOUBLE]);

class Stop extends Error {}

/**
 * Counts `b` as a `desc` message. Returns undefined when it stays within `limits`, else what it
 * passed ("embedded messages" or "fields and repeated values").
 */
export function overBudget(desc: DescMessage, b: Uint8Array, limits: WireLimits): string | undefined {
  let messages = 0;
  let values = 0;
  let pos = 0;
  const varint = (): number => {
    // Lengths and tags up to 2^53; a longer varint is the decoder's to reject.
    let v = 0;
    let mul = 1;
    for (let i = 0; i < 10; i++) {
      if (pos >= b.length) throw new Stop();
      const c = b[pos++];
      v += (c & 0x7f) * mul;
      if (c < 0x80) return v;
      mul *= 128;
    }
    throw new Stop();
  };
  const walk = (d: DescMessage, end: number): void => {
    while (pos < end) {
      const tag = varint();
      if (++values > limits.maxValues) throw new Stop("fields and repeated values");
      const wt = tag % 8;
      if (wt === 0) varint();
      else if (wt === 1) pos += 8;
      else if (wt === 5) pos += 4;
      else if (wt === 2) {
        const len = varint();
        const stop = pos + len;
        if (stop > end) throw new Stop();
        const f = fieldOf(d, Math.floor(tag / 8));
        const sub = f && (f.fieldKind === "message" || (f.fieldKind === "list" && f.listKind === "message")) ? f.message : undefined;
        if (sub) {
          if (++messages > limits.maxMessages) throw new Stop("embedded messages");
          walk(sub, stop);
        } else if (f?.fieldKind === "map") {
          // A map entry is an object of its own (the schema has no map of messages to enter).
          if (++messages > limits.maxMessages) throw new Stop("embedded messages");
        } else if (f?.fieldKind === "list" && f.listKind !== "message") {
          // Packed: a value per fixed width, or per varint (a byte below 0x80 ends one).
          const t = f.listKind === "enum" ? ScalarType.INT32 : f.scalar;
          let n = 0;
          if (FIXED32.has(t)) n = Math.floor(len / 4);
          else if (FIXED64.has(t)) n = Math.floor(len / 8);
          else if (t !== ScalarType.STRING && t !== ScalarType.BYTES) for (let i = pos; i < stop; i++) n += b[i] < 0x80 ? 1 : 0;
          values += n;
          if (values > limits.maxValues) throw new Stop("fields and repeated values");
        }
        pos = stop;
      } else throw new Stop(); // groups, or not a wire type: the decoder's to reject
      if (pos > end) throw new Stop();
    }
  };
  try {
    walk(desc, b.length);
    return undefined;
  } catch (e) {
    if (!(e instanceof Stop)) throw e;
    if (!e.message) return undefined; // malformed: the decoder says why
    return e.message === "embedded messages" ? `more than ${limits.maxMessages} embedded messages` : `more than ${limits.maxValues} fields and repeated values`;
  }
}
