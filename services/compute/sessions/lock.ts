/**
 * A per-session async lock: two calls never run on one session at once (a prefill and a
 * decode of the same session would interleave their appends otherwise). FIFO.
 */
export class AsyncLock {
  private tail: Promise<void> = Promise.resolve();
  private holders = 0;

  get busy(): boolean {
    return this.holders > 0;
  }

  /**
   * Resolves with a release function once every earlier holder released. With `signal`, a wait
   * that the signal ends rejects with its reason and gives up its place: when its turn comes, it
   * passes the lock on at once.
   */
  acquire(signal?: AbortSignal): Promise<() => void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    let release!: () => void;
    const mine = new Promise<void>((r) => (release = r));
    const prev = this.tail;
    this.tail = prev.then(() => mine);
    this.holders++;
    let released = false;
    const ready = prev.then(() => () => {
      if (released) return;
      released = true;
      this.holders--;
      release();
    });
    if (!signal) return ready;
    return new Promise((resolve, reject) => {
      let abandoned = false;
      const onAbort = () => {
        abandoned = true;
        reject(signal.reason);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      void ready.then((rel) => {
        signal.removeEventListener("abort", onAbort);
        if (abandoned) rel();
        else resolve(rel);
      });
    });
  }

  async run<T>(fn: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    const release = await this.acquire(signal);
    try {
      return await fn();
    } finally {
      release();
    }
  }
}
