/**
 * The log of a GPU-machine script: each line to stdout and to `<OUT>/<name>` (OUT defaults to
 * .gpu/out; the folder is created and the file started empty), so the log comes back with $OUT.
 */
import { appendFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

export const outDir = process.env.OUT ?? ".gpu/out";

export function outLog(name: string): (line: string) => void {
  mkdirSync(outDir, { recursive: true });
  const file = join(outDir, name);
  writeFileSync(file, "");
  return (line: string) => {
    console.log(line);
    appendFileSync(file, line + "\n");
  };
}
