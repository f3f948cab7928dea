/** KvStoreService over gRPC: thin handlers around KvStore. */
import type { KvStoreServiceServer } from "../../proto/gen/freekv/v1/kvstore.js";
import { unary } from "../common/handlers.js";
import type { Logger } from "../common/log.js";
import type { KvStore } from "./store.js";

export function kvstoreService(store: KvStore, log: Logger): KvStoreServiceServer {
  return {
    // The caller gave up (cancelled, or its deadline passed) while the session was made: it gets
    // CANCELLED / DEADLINE_EXCEEDED and will never use it, so what this call created goes, under
    // the session's lock (store.attach).
    attachSession: unary(log, "AttachSession", (req, signal) => store.attach(req, signal)),
    commitPages: unary(log, "CommitPages", (req) => store.commitPages(req)),
    releaseSession: unary(log, "ReleaseSession", async (req) => ({ released: await store.release(req.sessionId, req.creationToken) })),
    getStats: unary(log, "GetStats", async () => store.stats()),
    listSessions: unary(log, "ListSessions", async () => ({ sessionIds: store.list() })),
    reserveContext: unary(log, "ReserveContext", (req) => store.reserve(req.sessionId, req.tokens, req.callerCommits)),
  };
}
