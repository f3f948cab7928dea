/**
 * The kvstore in this process, for the command line, the fidelity harness, benchmarks and tests:
 * the same KvStore the kvstore process serves, over the in-memory directory, with no capacity
 * limit and a silent log. Its sessions' segments are removed when released, and at the latest when
 * the process exits (an interrupted run included).
 */
import { createLogger } from "../common/log.js";
import { MemoryDirectory } from "./directory.js";
import { KvStore } from "./store.js";

let store: KvStore | undefined;
let seq = 0;

export function localKvStore(): KvStore {
  if (store) return store;
  const s = new KvStore(new MemoryDirectory(), Number.MAX_SAFE_INTEGER, createLogger("kvstore", "silent"), undefined, true);
  store = s;
  process.on("exit", () => s.removeAllNow());
  // An interrupted command (Ctrl-C, kill) would otherwise skip the exit handlers.
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    process.once(sig, () => {
      s.removeAllNow();
      process.exit(128 + (sig === "SIGINT" ? 2 : 15));
    });
  }
  return s;
}

/** A session id no other local session of this process has. */
export function localSessionId(prefix: string): string {
  return `${prefix}-${process.pid}-${++seq}`;
}
