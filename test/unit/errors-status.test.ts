/**
 * The status a failure is answered with (services/common/errors.ts toStatus): a ServiceError's
 * own, a peer's actionable status passed through, a full /dev/shm met by the engine as
 * RESOURCE_EXHAUSTED, anything else INTERNAL; details bounded; a cancelled call's reason first.
 */
import { describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { MAX_DETAILS_CHARS, ServiceError, toStatus } from "../../services/common/errors.js";
import { createLogger } from "../../services/common/log.js";
import { capturedLogger } from "../helpers/log.js";

const log = createLogger("test", "silent");

describe("toStatus", () => {
  it("maps each kind of failure to the status a client can act on", () => {
    expect(toStatus(new ServiceError(status.NOT_FOUND, "session x not found"), log, "M")).toMatchObject({ code: status.NOT_FOUND, details: "session x not found" });
    const peer = Object.assign(new Error("5 NOT_FOUND: gone"), { code: status.RESOURCE_EXHAUSTED, details: "kvstore full" });
    expect(toStatus(peer, log, "M")).toMatchObject({ code: status.RESOURCE_EXHAUSTED, details: "kvstore full" });
    // A corrupt session at the kvstore stays DATA_LOSS for the client (not INTERNAL).
    const peerLoss = Object.assign(new Error("15 DATA_LOSS"), { code: status.DATA_LOSS, details: "session s is corrupt" });
    expect(toStatus(peerLoss, log, "M")).toMatchObject({ code: status.DATA_LOSS, details: "session s is corrupt" });
    const peerInternal = Object.assign(new Error("13 INTERNAL"), { code: status.INTERNAL, details: "boom" });
    expect(toStatus(peerInternal, log, "M").code).toBe(status.INTERNAL);
    // What the CUDA engine says when it cannot commit a session's host memory.
    const shm = new Error("the session's host memory could not be committed: /dev/shm is full (madvise(MADV_POPULATE_WRITE): No space left on device)");
    expect(toStatus(shm, log, "Generate")).toMatchObject({ code: status.RESOURCE_EXHAUSTED, details: shm.message });
    expect(toStatus(new Error("cudaHostRegister failed"), log, "Generate")).toMatchObject({ code: status.INTERNAL, details: "internal error: cudaHostRegister failed" });
    const long = toStatus(new ServiceError(status.INVALID_ARGUMENT, "x".repeat(5000)), log, "M");
    expect(long.details.length).toBeLessThan(MAX_DETAILS_CHARS + 40);
    expect(long.details).toMatch(/\(5000 characters\)$/);
    const ac = new AbortController();
    ac.abort(new ServiceError(status.DEADLINE_EXCEEDED, "deadline"));
    expect(toStatus(shm, log, "M", ac.signal)).toMatchObject({ code: status.DEADLINE_EXCEEDED });
  });

  it("answers a cancelled call with its reason, and still logs an error of the service's own that came meanwhile", () => {
    const lines: Array<Record<string, unknown>> = [];
    const logged = capturedLogger(lines, "test");
    const ac = new AbortController();
    const reason = new ServiceError(status.CANCELLED, "client went away");
    ac.abort(reason);
    const own = new Error(`the model failed (${Math.random()})`);
    expect(toStatus(own, logged, "Generate", ac.signal)).toMatchObject({ code: status.CANCELLED, details: "client went away" });
    // The cancellation itself and its consequences are not errors of the service.
    const destroyed = Object.assign(new Error("Cannot call write after a stream was destroyed"), { code: "ERR_STREAM_DESTROYED" });
    for (const e of [reason, new ServiceError(status.UNAVAILABLE, "x"), destroyed]) expect(toStatus(e, logged, "Generate", ac.signal).code).toBe(status.CANCELLED);
    const errors = lines.filter((l) => l.level === "error");
    expect(errors).toHaveLength(1);
    expect((errors[0].err as { message: string }).message).toBe(own.message);
    expect(errors[0].method).toBe("Generate");
  });
});
