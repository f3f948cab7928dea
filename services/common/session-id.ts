/**
 * Session ids, one rule for both tiers and every API: 1-128 characters of [A-Za-z0-9._-], checked
 * before an id is looked up anywhere (a map, the kvstore, the Redis directory) or stored.
 */
import { invalidArgument } from "./errors.js";

export const SESSION_ID_RE = /^[A-Za-z0-9._-]{1,128}$/;

/** INVALID_ARGUMENT naming `field` unless `id` is a valid session id. */
export function checkSessionId(id: string, field = "session_id"): void {
  if (!SESSION_ID_RE.test(id)) throw invalidArgument(field, "must match [A-Za-z0-9._-]{1,128}");
}
