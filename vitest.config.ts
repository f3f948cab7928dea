import { defineConfig } from "vitest/config";

// Suites load the native addon and start real processes: run them in forked workers.
// The JSON report is what .ci/run counts from.
export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    pool: "forks",
    maxWorkers: 2,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    reporters: ["default", ["json", { outputFile: ".vitest-report.json" }]],
  },
});
