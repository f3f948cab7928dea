/**
 * The scoring rule of `freekv eval`, in one place.
 *
 * A task is correct when every expected answer string occurs in the generated text (exact,
 * case-sensitive substring match). For the families whose answers have an order
 * (multi_query, ordered_retrieval, multi_value) they must also occur in that order: each answer
 * is looked for after the end of the previous answer found. An answer that is missing is
 * skipped (the search for the next one goes on from the same place), so a partial answer still
 * counts the answers it got right, in order. For the other families presence anywhere suffices.
 *
 * `fraction` is found / expected, the partial credit reported beside the accuracy.
 */
import type { Family } from "./tasks.js";

export const ORDERED_FAMILIES: ReadonlySet<Family> = new Set<Family>(["multi_query", "ordered_retrieval", "multi_value"]);

export interface Score {
  correct: boolean;
  /** Per expected answer, whether it was found (in order, for ordered families). */
  found: boolean[];
  fraction: number;
}

export function scoreAnswer(family: Family, generated: string, answers: readonly string[]): Score {
  const ordered = ORDERED_FAMILIES.has(family);
  const found: boolean[] = [];
  let from = 0;
  for (const a of answers) {
    const at = generated.indexOf(a, ordered ? from : 0);
    found.push(at >= 0);
    if (ordered && at >= 0) from = at + a.length;
  }
  const hits = found.filter(Boolean).length;
  return { correct: answers.length > 0 && hits === answers.length, found, fraction: answers.length === 0 ? 0 : hits / answers.length };
}
