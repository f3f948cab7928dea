/**
 * The scoring rule: presence for the unordered families, in-order search for multi_query,
 * ordered_retrieval and multi_value, and the fraction of answers found.
 */
import { describe, expect, it } from "vitest";
import { ORDERED_FAMILIES, scoreAnswer } from "../../tools/eval/score.js";
import { FAMILIES } from "../../tools/eval/tasks.js";

describe("scoreAnswer", () => {
  it("orders exactly the families whose answers have an order", () => {
    expect([...ORDERED_FAMILIES].sort()).toEqual(["multi_query", "multi_value", "ordered_retrieval"]);
    for (const f of ORDERED_FAMILIES) expect(FAMILIES).toContain(f);
  });

  it("unordered families: every answer present anywhere is correct, whatever the order", () => {
    for (const f of ["single_needle", "multi_key", "variable_tracking"] as const) {
      expect(scoreAnswer(f, "the values are 17 and 42.", ["42", "17"])).toEqual({ correct: true, found: [true, true], fraction: 1 });
      expect(scoreAnswer(f, "the value is 42", ["42"])).toEqual({ correct: true, found: [true], fraction: 1 });
    }
  });

  it("ordered families: answers out of order are partial, in order are correct", () => {
    for (const f of ORDERED_FAMILIES) {
      expect(scoreAnswer(f, "17 then 42", ["17", "42"])).toEqual({ correct: true, found: [true, true], fraction: 1 });
      // 42 is found, then 17 is looked for after it: missing.
      expect(scoreAnswer(f, "17 then 42", ["42", "17"])).toEqual({ correct: false, found: [true, false], fraction: 0.5 });
      // A repeated answer needs two occurrences.
      expect(scoreAnswer(f, "7 and 7", ["7", "7"]).correct).toBe(true);
      expect(scoreAnswer(f, "7 only", ["7", "7"])).toEqual({ correct: false, found: [true, false], fraction: 0.5 });
      // A match cannot overlap the previous one.
      expect(scoreAnswer(f, "aba", ["ab", "ba"]).found).toEqual([true, false]);
      // A missing answer does not move the search: the next one is still found.
      expect(scoreAnswer(f, "alpha gamma", ["alpha", "beta", "gamma"])).toEqual({ correct: false, found: [true, false, true], fraction: 2 / 3 });
    }
  });

  it("partial credit and the empty generation", () => {
    expect(scoreAnswer("multi_key", "only 42 here", ["42", "17", "99", "5"])).toEqual({ correct: false, found: [true, false, false, false], fraction: 0.25 });
    expect(scoreAnswer("single_needle", "", ["42"])).toEqual({ correct: false, found: [false], fraction: 0 });
    expect(scoreAnswer("multi_value", "", ["a", "b"]).fraction).toBe(0);
  });

  it("is an exact, case-sensitive substring match", () => {
    expect(scoreAnswer("single_needle", "The Answer", ["answer"]).correct).toBe(false);
    expect(scoreAnswer("single_needle", "key=1234", ["123"]).correct).toBe(true);
  });
});
