/**
 * A client of the compute service's Attention stream: send a request, await its response
 * (matched by request_id). Used by the demo, the overhead benchmark and the tests.
 */
import type { ServiceError } from "@grpc/grpc-js";
import { AttentionRequest, type AttentionResponse, type ComputeServiceClient } from "../../proto/gen/freekv/v1/compute.js";
import type { Tensor } from "../../proto/gen/freekv/v1/common.js";

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
