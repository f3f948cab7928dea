/**
 * The tensor exchange of one Attention stream: a shared-memory segment the compute process makes
 * on request (ShmSegment.create: exclusive, mode 0600, random name) so that an engine on the same
 * host passes q/k/v and receives outputs through memory, and the stream carries only offsets.
 * Moving ~400 KB of inputs and ~260 KB of outputs through grpc-js per batch-16 layer message
 * costs milliseconds; a copy out of a mapping costs microseconds.
 *
 * Reads are exactly as strict as the bytes path (tensor.ts): dtype, shape against the geometry,
 * bounds inside the segment, 16-byte aligned offsets, finite values; and every read copies, since
 * the client may reuse the region as soon as the response arrives. The segment is unlinked when
 * the stream ends, and at process exit for any stream still open then.
 *
 * Exchanges are counted: a stream has at most one, and all of this process's together at most
 * the ExchangeBudget's capacity (FREEKV_EXCHANGE_CAPACITY_BYTES). A tmpfs segment is sized
 * without being allocated, so one larger than what /dev/shm has free would only fail when written
 * (SIGBUS, the process dies): the free space is checked before each one is made, and the segment
 * is committed (fallocate) before the stream may use it, so an exchange that does not fit, or whose
 * space was taken meanwhile, is refused (RESOURCE_EXHAUSTED) instead.
 */
import { randomBytes } from "node:crypto";
import { readdirSync, statfsSync } from "node:fs";
import { loadAddon, type ShmSegment } from "../../../native/binding.js";
import { DType, type Tensor } from "../../../proto/gen/freekv/v1/common.js";
import type { TensorRef } from "../../../proto/gen/freekv/v1/compute.js";
import { invalidArgument, resourceExhausted } from "../../common/errors.js";
import { ownerAlive, ownerTag } from "../../common/process-owner.js";
import { bf16ToF32, checkFinite, checkTensorHeader, f32ToBf16 } from "./tensor.js";

export const EXCHANGE_ALIGNMENT = 16;
export const EXCHANGE_DEFAULT_BYTES = 16 << 20;
export const EXCHANGE_MAX_BYTES = 1 << 30;
const PAGE = 4096;

const fmt = (s: number[]) => `[${s.join(", ")}]`;

/**
 * Exchange names carry their creator: `/freekv-xch-<pid>-<start time>-<random>` (process-owner.ts).
 */
const EXCHANGE_NAME = /^freekv-xch-(\d+)-(\d+)-[0-9a-f]+$/;


/**
 * Removes the exchange segments of compute processes that are gone (killed without running their
 * exit hook). Called when compute starts; one compute process per /dev/shm (one per pod) is the
 * deployment this assumes. Returns the names removed.
 */
export function sweepStaleExchanges(): string[] {
  let entries: string[];
  try {
    entries = readdirSync("/dev/shm");
  } catch {
    return [];
  }
  const removed: string[] = [];
  const { ShmSegment } = loadAddon();
  for (const e of entries) {
    const m = EXCHANGE_NAME.exec(e);
    if (!m) continue;
    const pid = Number(m[1]);
    if (ownerAlive(pid, m[2])) continue; // its creator still runs
    try {
      if (ShmSegment.unlink(`/${e}`)) removed.push(`/${e}`);
    } catch {
      // Not ours to remove (permissions): leave it.
    }
  }
  return removed;
}

/** Size and free space of /dev/shm in bytes (statfs); undefined when it cannot be read. */
export function shmSpace(dir = "/dev/shm"): { total: number; free: number } | undefined {
  try {
    const st = statfsSync(dir);
    return { total: st.blocks * st.bsize, free: st.bavail * st.bsize };
  } catch {
    return undefined;
  }
}

/** Default FREEKV_EXCHANGE_CAPACITY_BYTES: 1/8 of /dev/shm (256 MiB when its size is unknown). */
export function defaultExchangeCapacity(): number {
  const space = shmSpace();
  return space ? Math.floor(space.total / 8) : 256 << 20;
}

/**
 * The bytes of exchange segments this process may hold at once. `free` reports /dev/shm's free
 * space (replaceable in tests).
 */
export class ExchangeBudget {
  private used = 0;
  private count = 0;

  constructor(
    readonly capacity: number,
    private readonly free: () => number | undefined = () => shmSpace()?.free,
  ) {}

  get bytesInUse(): number {
    return this.used;
  }

  get open(): number {
    return this.count;
  }

  /** Takes `bytes` for a new exchange, or throws RESOURCE_EXHAUSTED saying which limit it passes. */
  reserve(bytes: number): void {
    if (this.used + bytes > this.capacity) {
      throw resourceExhausted(
        `open_exchange: ${bytes} bytes would bring this process's tensor exchanges to ${this.used + bytes} bytes, over FREEKV_EXCHANGE_CAPACITY_BYTES=${this.capacity} (${this.count} open, ${this.used} bytes); close a stream or ask for less`,
      );
    }
    const free = this.free();
    if (free !== undefined && bytes > free) {
      throw resourceExhausted(`open_exchange: ${bytes} bytes is more than /dev/shm has free (${free} bytes)`);
    }
    this.used += bytes;
    this.count++;
  }

  release(bytes: number): void {
    this.used = Math.max(0, this.used - bytes);
    this.count = Math.max(0, this.count - 1);
  }
}

/** Names of the exchanges open in this process, unlinked at exit if their streams never ended. */
const live = new Set<string>();
let exitHook = false;
function track(name: string): void {
  live.add(name);
  if (exitHook) return;
  exitHook = true;
  process.once("exit", () => {
    const { ShmSegment } = loadAddon();
    for (const n of live) ShmSegment.unlink(n);
  });
}

export class TensorExchange {
  private bytes: Uint8Array;
  private closed = false;
  /** Kept apart: the segment's own getters throw once it is unmapped. */
  readonly name: string;
  readonly size: number;

  private constructor(
    private readonly segment: ShmSegment,
    private readonly budget: ExchangeBudget,
  ) {
    this.bytes = new Uint8Array(segment.buffer());
    this.name = segment.name;
    this.size = segment.size;
  }

  /** Makes the segment for an AttentionOpenExchange asking for `sizeBytes` (0 = default), within `budget`. */
  static open(sizeBytes: number, field: string, budget: ExchangeBudget): TensorExchange {
    const want = sizeBytes === 0 ? EXCHANGE_DEFAULT_BYTES : sizeBytes;
    if (want > EXCHANGE_MAX_BYTES) throw invalidArgument(field, `${want} bytes is more than the limit ${EXCHANGE_MAX_BYTES}`);
    const size = Math.ceil(want / PAGE) * PAGE;
    budget.reserve(size);
    const name = `/freekv-xch-${ownerTag}-${randomBytes(16).toString("hex")}`;
    const { ShmSegment } = loadAddon();
    let seg: ShmSegment;
    try {
      seg = ShmSegment.create(name, size);
    } catch (e) {
      budget.release(size);
      throw e;
    }
    track(name);
    // Committed now: the free space checked above may be taken by the kvstore or anyone else
    // before the first write, and a write to an unbacked tmpfs page is SIGBUS, not an error.
    try {
      seg.allocate(0, size);
    } catch (e) {
      try {
        seg.close();
      } finally {
        ShmSegment.unlink(name);
        live.delete(name);
        budget.release(size);
      }
      const err = e as Error & { code?: string };
      if (err.code === "ENOSPC") throw resourceExhausted(`open_exchange: /dev/shm is full: cannot commit ${size} bytes for the exchange`);
      throw e;
    }
    return new TensorExchange(seg, budget);
  }

  /** Bounds and alignment of [offset, offset + bytes) for the field `field`. */
  private region(offset: number, bytes: number, field: string): void {
    if (offset % EXCHANGE_ALIGNMENT !== 0) throw invalidArgument(field, `${offset} is not a multiple of ${EXCHANGE_ALIGNMENT}`);
    if (offset + bytes > this.size) throw invalidArgument(field, `${bytes} bytes at ${offset} run past the end of the exchange (${this.size} bytes)`);
  }

  /**
   * The float32 copy of `ref` of exactly `shape` (a -1 entry takes the ref's own size, >= 1);
   * the same checks and messages as readTensor, with the ref's field names.
   */
  read(ref: TensorRef, field: string, shape: number[]): { data: Float32Array; shape: number[]; dtype: DType } {
    const { n, elem } = checkTensorHeader(ref.dtype, ref.shape, field, shape);
    this.region(ref.offset, n * elem, `${field}.offset`);
    let data: Float32Array;
    if (elem === 4) data = new Float32Array(this.bytes.buffer, ref.offset, n).slice();
    else data = bf16ToF32(this.bytes.subarray(ref.offset, ref.offset + 2 * n), n);
    checkFinite(data, field);
    return { data, shape: [...ref.shape], dtype: ref.dtype };
  }

  /** Checks that an output of `elements` values of `dtype` fits at `offset`. */
  checkOutput(offset: number, elements: number, dtype: DType, field: string): void {
    this.region(offset, elements * (dtype === DType.D_TYPE_BFLOAT16 ? 2 : 4), field);
  }

  /** Writes an output (checked by checkOutput) in `dtype` at `offset`. */
  write(offset: number, data: Float32Array, dtype: DType): void {
    if (dtype === DType.D_TYPE_BFLOAT16) this.bytes.set(f32ToBf16(data), offset);
    else new Float32Array(this.bytes.buffer, offset, data.length).set(data);
  }

  /** Unmaps and removes the name: the stream is over. Runs once; never throws (it runs in a finally). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.bytes = new Uint8Array(0);
    try {
      this.segment.close();
    } finally {
      loadAddon().ShmSegment.unlink(this.name);
      live.delete(this.name);
      this.budget.release(this.size);
    }
  }
}

/** Exactly one of the bytes tensor and the ref: INVALID_ARGUMENT naming the field otherwise. */
export function pickOne(t: Tensor | undefined, ref: TensorRef | undefined, field: string): "bytes" | "ref" {
  if (t && ref) throw invalidArgument(field, `set either ${field.split(".").pop()} or ${field.split(".").pop()}_ref, not both`);
  if (!t && !ref) throw invalidArgument(field, `is required (${field.split(".").pop()} or ${field.split(".").pop()}_ref)`);
  return t ? "bytes" : "ref";
}
