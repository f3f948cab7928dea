/** A client for the Attention stream: send a request, await its response (matched by request_id). */
import type { ServiceError } from "@grpc/grpc-js";
import { AttentionRequest, type AttentionResponse, type ComputeServiceClient } from "../../proto/gen/freekv/v1/compute.js";
import { DType, type Tensor } from "../../proto/gen/freekv/v1/common.js";

export function f32Tensor(data: Float32Array, shape: number[]): Tensor {
  return { dtype: DType.D_TYPE_FLOAT32, shape, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength) };
}

/** bf16 by truncation-free round-to-nearest-even, written independently of the service's codec. */
export function toBf16(data: Float32Array): { bytes: Buffer; rounded: Float32Array } {
  const bytes = Buffer.alloc(data.length * 2);
  const rounded = new Float32Array(data.length);
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  for (let i = 0; i < data.length; i++) {
    f[0] = data[i];
    const lsb = (u[0] >>> 16) & 1;
    const hi = ((u[0] + 0x7fff + lsb) >>> 16) & 0xffff;
    bytes.writeUInt16LE(hi, 2 * i);
    u[0] = hi << 16;
    rounded[i] = f[0];
  }
  return { bytes, rounded };
}

export function tensorToF32(t: Tensor): Float32Array {
  if (t.dtype === DType.D_TYPE_FLOAT32) {
    const out = new Float32Array(t.data.length / 4);
    new Uint8Array(out.buffer).set(t.data);
    return out;
  }
  const out = new Float32Array(t.data.length / 2);
  const u = new Uint32Array(out.buffer);
  for (let i = 0; i < out.length; i++) u[i] = t.data.readUInt16LE(2 * i) << 16;
  return out;
}

export class AttentionStream {
  private readonly call;
  private readonly waiting = new Map<number, { resolve(r: AttentionResponse): void; reject(e: unknown): void }>();
  private nextId = 1;
  error: ServiceError | undefined;
  readonly ended: Promise<ServiceError | undefined>;

  constructor(client: ComputeServiceClient, deadlineMs?: number) {
    this.call = deadlineMs === undefined ? client.attention() : client.attention({ deadline: Date.now() + deadlineMs });
    this.call.on("data", (r: AttentionResponse) => {
      const w = this.waiting.get(r.requestId);
      this.waiting.delete(r.requestId);
      w?.resolve(r);
    });
    this.ended = new Promise((resolve) => {
      this.call.on("error", (e: ServiceError) => {
        this.error = e;
        for (const w of this.waiting.values()) w.reject(e);
        this.waiting.clear();
        resolve(e);
      });
      this.call.on("end", () => resolve(undefined));
    });
  }

  send(req: Partial<AttentionRequest>): Promise<AttentionResponse> {
    const requestId = this.nextId++;
    return new Promise((resolve, reject) => {
      if (this.error) return reject(this.error);
      this.waiting.set(requestId, { resolve, reject });
      this.call.write(AttentionRequest.fromPartial({ ...req, requestId }));
    });
  }

  prefill(sessionId: string, layer: number, k: Tensor, v: Tensor) {
    return this.send({ op: { $case: "prefill", value: { sessionId, layer, k, v } } });
  }

  async decode(layer: number, items: Array<{ sessionId: string; q: Tensor; k: Tensor; v: Tensor }>): Promise<Tensor[]> {
    const r = await this.send({ op: { $case: "decode", value: { layer, items } } });
    if (r.result?.$case !== "decode") throw new Error("expected a decode result");
    return r.result.value.outputs;
  }

  close(): Promise<ServiceError | undefined> {
    this.call.end();
    return this.ended;
  }

  cancel(): void {
    this.call.cancel();
  }

  /** Stops reading responses (they pile up in the transport, then at the server). */
  pause(): void {
    this.call.pause();
  }

  resume(): void {
    this.call.resume();
  }
}
