/**
 * Per-tenant bearer tokens (FREEKV_AUTH_TOKENS_FILE): every call to compute (gRPC, and the OpenAI
 * front, which passes the Authorization header through) must carry `authorization: Bearer
 * <token>`; the token names the tenant, which then replaces any `x-freekv-tenant` the caller sent
 * (the request queue's fairness and the request log use it). A missing or unknown token is
 * UNAUTHENTICATED before anything is touched. A session created by a tenant (CreateSession) is
 * reachable only by that tenant: another tenant's call on it is PERMISSION_DENIED.
 *
 * The file holds no tokens, only their SHA-256: `{"<tenant>": "<hex sha256 of the token>", ...}`
 * (make one with `printf %s "$TOKEN" | sha256sum`). Tokens are compared by hash in constant time.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";
import { status, type Metadata, type handleBidiStreamingCall, type handleServerStreamingCall, type handleUnaryCall } from "@grpc/grpc-js";
import { quoteId, ServiceError, toStatus } from "../common/errors.js";
import type { Logger } from "../common/log.js";
import { TENANT_HEADER, tenantOf } from "./sessions/tenant.js";

export class TenantAuth {
  private constructor(private readonly hashes: { tenant: string; hash: Buffer }[]) {}

  /** Reads the tokens file; throws with the reason (the process refuses to start). */
  static fromFile(path: string): TenantAuth {
    let parsed: unknown;
    try {
      parsed = JSON.parse(readFileSync(path, "utf8"));
    } catch (e) {
      throw new Error(`FREEKV_AUTH_TOKENS_FILE=${path}: ${(e as Error).message}`);
    }
    if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) throw new Error(`FREEKV_AUTH_TOKENS_FILE=${path}: must be a JSON object {"tenant": "sha256 hex"}`);
    const hashes = Object.entries(parsed as Record<string, unknown>).map(([tenant, h]) => {
      if (!/^[\x21-\x7e]{1,128}$/.test(tenant)) throw new Error(`FREEKV_AUTH_TOKENS_FILE=${path}: tenant ${JSON.stringify(tenant.slice(0, 40))} must be 1-128 printable characters`);
      if (typeof h !== "string" || !/^[0-9a-f]{64}$/i.test(h)) throw new Error(`FREEKV_AUTH_TOKENS_FILE=${path}: tenant ${tenant}: must map to a 64-digit hex SHA-256`);
      return { tenant, hash: Buffer.from(h, "hex") };
    });
    if (!hashes.length) throw new Error(`FREEKV_AUTH_TOKENS_FILE=${path}: names no tenant`);
    return new TenantAuth(hashes);
  }

  /**
   * The tenant of the call's bearer token, written into its metadata as x-freekv-tenant; throws
   * UNAUTHENTICATED.
   */
  authenticate(md: Metadata): string {
    const v = md.get("authorization")[0];
    const m = typeof v === "string" ? /^Bearer\s+(\S{1,4096})$/i.exec(v.trim()) : null;
    if (!m) throw new ServiceError(status.UNAUTHENTICATED, "a bearer token is required (metadata authorization: Bearer <token>)");
    const h = createHash("sha256").update(m[1]).digest();
    let tenant: string | undefined;
    for (const e of this.hashes) if (timingSafeEqual(e.hash, h)) tenant = e.tenant;
    if (tenant === undefined) throw new ServiceError(status.UNAUTHENTICATED, "unknown bearer token");
    md.set(TENANT_HEADER, tenant);
    return tenant;
  }
}

/** The handlers with the token checked first (unchanged when auth is off). */
export function authenticated<T extends Record<string, unknown>>(auth: TenantAuth | undefined, log: Logger, handlers: T, kinds: Record<keyof T, "unary" | "stream">): T {
  if (!auth) return handlers;
  const out: Record<string, unknown> = {};
  for (const [name, h] of Object.entries(handlers)) {
    if (kinds[name as keyof T] === "unary") {
      const inner = h as handleUnaryCall<unknown, unknown>;
      out[name] = ((call, callback) => {
        try {
          auth.authenticate(call.metadata);
        } catch (e) {
          return callback(toStatus(e, log, name));
        }
        return inner(call, callback);
      }) as handleUnaryCall<unknown, unknown>;
    } else {
      const inner = h as handleServerStreamingCall<unknown, unknown> | handleBidiStreamingCall<unknown, unknown>;
      out[name] = ((call: Parameters<typeof inner>[0]) => {
        try {
          auth.authenticate(call.metadata);
        } catch (e) {
          call.emit("error", toStatus(e, log, name));
          return;
        }
        return (inner as (c: typeof call) => void)(call);
      }) as typeof inner;
    }
  }
  return out as T;
}

/** PERMISSION_DENIED unless the session belongs to the call's tenant (auth on: `tenant` defined). */
export function checkTenant(sessionTenant: unknown, tenant: string | undefined, id: string): void {
  if (tenant === undefined) return;
  if (sessionTenant !== tenant) throw new ServiceError(status.PERMISSION_DENIED, `session ${quoteId(id)} belongs to another tenant`);
}

/** The call's authenticated tenant (authenticate wrote it into the metadata) when authentication is on; undefined otherwise. */
export function authenticatedTenant(auth: TenantAuth | undefined, md: Metadata): string | undefined {
  return auth ? tenantOf(md) : undefined;
}
