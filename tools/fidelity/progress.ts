/**
 * A one-line progress bar on stderr for long replays; silent when stderr is not a terminal, so
 * pipes, CI logs and --json consumers see nothing of it.
 */
export function progressBar(label: string, stream: NodeJS.WriteStream = process.stderr): { update(done: number, total: number): void; done(): void } {
  if (!stream.isTTY) return { update() {}, done() {} };
  let last = -1;
  const started = Date.now();
  return {
    update(done: number, total: number) {
      const pct = Math.floor((100 * done) / total);
      if (pct === last) return;
      last = pct;
      const width = 30;
      const fill = Math.round((width * done) / total);
      const secs = ((Date.now() - started) / 1000).toFixed(1);
      stream.write(`\r${label} [${"#".repeat(fill)}${".".repeat(width - fill)}] ${done}/${total} ${secs}s`);
    },
    done() {
      if (last >= 0) stream.write("\r\x1b[K");
    },
  };
}
