/**
 * Which process made a shared-memory segment: names carry `<pid>-<start time>`, the start time
 * being field 22 of /proc/<pid>/stat (clock ticks since boot), so a reused pid is told apart from
 * the process that made the segment. A sweep at start removes the names whose maker is gone.
 */
import { readFileSync } from "node:fs";

export function processStartTime(pid: number | "self"): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
  } catch {
    return undefined;
  }
}

/** `<pid>-<start time>` of this process. */
export const ownerTag = `${process.pid}-${processStartTime("self") ?? "0"}`;

/** Whether the process `pid` that started at `startTime` still runs. */
export function ownerAlive(pid: number, startTime: string): boolean {
  return processStartTime(pid) === startTime;
}
