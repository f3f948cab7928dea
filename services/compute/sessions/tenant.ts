/** The tenant of a call: the request metadata header `x-freekv-tenant` ("" without it). */
import type { Metadata } from "@grpc/grpc-js";
import { invalidArgument } from "../../common/errors.js";

export const TENANT_HEADER = "x-freekv-tenant";

export function tenantOf(md: Metadata): string {
  const v = md.get(TENANT_HEADER)[0];
  const t = typeof v === "string" ? v.trim() : "";
  if (t.length > 128) throw invalidArgument(TENANT_HEADER, `must be at most 128 characters, got ${t.length}`);
  return t;
}
