/**
 * Errors of the OpenAI front in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
 * with the HTTP status a client of that API expects. The statuses the Generate path reports are
 * gRPC codes (services/common/errors.ts); each maps to its HTTP counterpart: bad input 400,
 * unknown session 404, overload 429, not ready or draining 503, deadline 504.
 */
import { status, type StatusObject } from "@grpc/grpc-js";
import { NEVER_FITS_TRAILER } from "../../common/errors.js";

export interface OpenAIErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
    readonly type: string = errorType(status),
  ) {
    super(message);
    this.name = "HttpError";
  }

  body(): OpenAIErrorBody {
    return { error: { message: this.message, type: this.type, param: this.param, code: this.code } };
  }
}

/** 400 naming the body field at fault. */
export const badRequest = (param: string | null, message: string, code: string | null = null) => new HttpError(400, message, param, code);

function errorType(httpStatus: number): string {
  if (httpStatus === 429) return "rate_limit_error";
  if (httpStatus === 504) return "timeout";
  if (httpStatus >= 500) return "server_error";
  return "invalid_request_error";
}

const HTTP_OF: Partial<Record<status, { http: number; code: string | null }>> = {
  [status.INVALID_ARGUMENT]: { http: 400, code: null },
  [status.FAILED_PRECONDITION]: { http: 400, code: null },
  [status.OUT_OF_RANGE]: { http: 400, code: null },
  [status.NOT_FOUND]: { http: 404, code: "not_found" },
  [status.ALREADY_EXISTS]: { http: 409, code: null },
  [status.ABORTED]: { http: 409, code: null },
  [status.RESOURCE_EXHAUSTED]: { http: 429, code: "resource_exhausted" },
  [status.UNAVAILABLE]: { http: 503, code: "unavailable" },
  [status.DEADLINE_EXCEEDED]: { http: 504, code: "deadline_exceeded" },
  [status.CANCELLED]: { http: 499, code: "cancelled" },
  [status.UNIMPLEMENTED]: { http: 501, code: null },
  [status.UNAUTHENTICATED]: { http: 401, code: null },
  [status.PERMISSION_DENIED]: { http: 403, code: null },
};

/** The HTTP error for the status the Generate handler ended a call with. */
export function fromGrpcStatus(st: Pick<StatusObject, "code" | "details"> & { metadata?: StatusObject["metadata"] }): HttpError {
  // A request larger than the whole service: 400, since a retry (429's promise) cannot succeed.
  if (st.code === status.RESOURCE_EXHAUSTED && st.metadata?.get(NEVER_FITS_TRAILER)?.[0] === "1") return new HttpError(400, st.details, null, "request_too_large");
  const m = HTTP_OF[st.code] ?? { http: 500, code: null };
  return new HttpError(m.http, st.details || status[st.code] || "error", null, m.code);
}
