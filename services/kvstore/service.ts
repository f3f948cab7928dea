/** KvStoreService over gRPC: thin handlers around KvStore. */
import type { KvStoreServiceServer } from "../../proto/gen/freekv/v1/kvstore.js";
import { unary } from "../common/handlers.js";
import type { Logger } from "../common/log.js";
import type { KvStore } from "./store.js";

export function kvstoreService(store: KvStore, log: Logger): KvStoreServiceServer {
  return {
    attachSession: unary(log, "AttachSession", async (req, signal) => {
      const r = await store.attach(req);
      // The caller gave up (cancelled, or its deadline passed) while the session was made: it
      // gets CANCELLED / DEADLINE_EXCEEDED and will never use it, so what this call created goes.
      if (signal.aborted && r.created) {
        await store.release(req.sessionId).catch((e: Error) => log.error({ session: req.sessionId, err: e.message }, "cannot release the session of a cancelled AttachSession"));
        log.warn({ session: req.sessionId }, "AttachSession cancelled by its caller: the session it created is released");
      }
      return r;
    }),
    commitPages: unary(log, "CommitPages", (req) => store.commitPages(req)),
    releaseSession: unary(log, "ReleaseSession", async (req) => ({ released: await store.release(req.sessionId) })),
    getStats: unary(log, "GetStats", async () => store.stats()),
    listSessions: unary(log, "ListSessions", async () => ({ sessionIds: store.list() })),
    reserveContext: unary(log, "ReserveContext", (req) => store.reserve(req.sessionId, req.tokens, req.callerCommits)),
  };
}
