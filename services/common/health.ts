/**
 * grpc.health.v1 for a service: "" (the whole server) plus each named service. Watch streams
 * come from grpc-health-check; flipping to NOT_SERVING at drain is what takes the pod out of
 * load balancing before the server stops accepting.
 */
import { HealthImplementation, type ServingStatus } from "grpc-health-check";
import type { Server } from "@grpc/grpc-js";

export class Health {
  private readonly impl: HealthImplementation;

  constructor(private readonly services: string[]) {
    const initial: Record<string, ServingStatus> = { "": "NOT_SERVING" };
    for (const s of services) initial[s] = "NOT_SERVING";
    this.impl = new HealthImplementation(initial);
  }

  addToServer(server: Server): void {
    this.impl.addToServer(server);
  }

  private stopping = false;
  private current: "SERVING" | "NOT_SERVING" = "NOT_SERVING";

  /** What Check answers now (for servers beside the gRPC one, e.g. an HTTP front). */
  get status(): "SERVING" | "NOT_SERVING" {
    return this.current;
  }

  /** SERVING is ignored once the drain started. */
  set(status: "SERVING" | "NOT_SERVING"): void {
    if (this.stopping && status === "SERVING") return;
    this.current = status;
    this.impl.setStatus("", status);
    for (const s of this.services) this.impl.setStatus(s, status);
  }

  /** NOT_SERVING for good (the drain). */
  shutdown(): void {
    this.set("NOT_SERVING");
    this.stopping = true;
  }
}
