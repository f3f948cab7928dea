/**
 * Progress of `freekv eval` on stderr: on a terminal a bar redrawn in place (with the running
 * accuracy and an estimate of the time left); otherwise (a pipe, a CI log) one plain line each
 * time another tenth of the requests is done, so logs stay short.
 */
export interface ProgressSink {
  isTTY?: boolean;
  write(s: string): unknown;
}

export interface Progress {
  update(done: number, total: number, correct: number): void;
  done(): void;
}

export function progress(label: string, stream: ProgressSink = process.stderr, now: () => number = Date.now): Progress {
  const started = now();
  const tty = !!stream.isTTY;
  let lastTenth = 0;
  let drawn = false;
  return {
    update(done, total, correct) {
      const secs = (now() - started) / 1000;
      const eta = done > 0 ? (secs * (total - done)) / done : 0;
      const acc = done > 0 ? `${((100 * correct) / done).toFixed(1)}% correct` : "";
      if (tty) {
        const width = 30;
        const fill = Math.round((width * done) / total);
        stream.write(`\r\x1b[K${label} [${"#".repeat(fill)}${".".repeat(width - fill)}] ${done}/${total} ${acc} ${secs.toFixed(0)}s, ~${eta.toFixed(0)}s left`);
        drawn = true;
        return;
      }
      const tenth = Math.floor((10 * done) / total);
      if (tenth > lastTenth || done === total) {
        lastTenth = tenth;
        stream.write(`${label}: ${done}/${total} requests, ${acc}, ${secs.toFixed(1)}s\n`);
      }
    },
    done() {
      if (tty && drawn) stream.write("\r\x1b[K");
    },
  };
}
