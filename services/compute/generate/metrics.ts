/**
 * Generate's serving metrics, on the compute tier's registry.
 *
 * Three gauges carry the names that load-balancing routers scrape from vLLM (the Kubernetes
 * Gateway API Inference Extension's endpoint picker reads exactly these), with the same meaning:
 * - `vllm:num_requests_waiting`: Generate requests in the admission queue;
 * - `vllm:num_requests_running`: Generate requests admitted and not finished (prefilling or decoding);
 * - `vllm:kv_cache_usage_perc`: fraction (0..1, as vLLM's) of the KV memory that admission waits
 *   for, here the kvstore's host segments: bytes in use over FREEKV_KVSTORE_CAPACITY_BYTES.
 * The rest are per request (histograms) and totals (counters), under freekv_ names.
 */
import { Counter, Gauge, Histogram, type Registry } from "prom-client";
import type { AdmissionQueue } from "./admission.js";
import type { KvStoreClient } from "../kvstore-client.js";

const LATENCY = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10, 30, 100];
const PER_TOKEN = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3];
const RATE = [1, 3, 10, 30, 100, 300, 1e3, 3e3, 1e4, 3e4, 1e5, 3e5, 1e6];

export type GenerateMetrics = ReturnType<typeof generateMetrics>;

export function generateMetrics(registry: Registry, admission: AdmissionQueue, kvstore: KvStoreClient) {
  // One GetStats call to the kvstore per scrape serves both host-memory gauges and the usage.
  let last = { used: 0, capacity: 0 };
  let inflight: Promise<typeof last> | undefined;
  const hostKv = () =>
    (inflight ??= kvstore
      .stats(AbortSignal.timeout(1000))
      .then((s) => (last = { used: Number(s.segmentBytes), capacity: Number(s.capacityBytes) }))
      .catch(() => last) // kvstore unreachable: the scrape still answers, with the last figures
      .finally(() => setTimeout(() => (inflight = undefined), 100).unref()));

  new Gauge({
    name: "vllm:num_requests_waiting",
    help: "Generate requests waiting in the admission queue (for a running slot or host KV memory), or for the earlier turns on their session",
    registers: [registry],
    collect() {
      this.set(admission.waiting);
    },
  });
  new Gauge({
    name: "vllm:num_requests_running",
    help: "Generate requests admitted and not finished (prefilling or decoding)",
    registers: [registry],
    collect() {
      this.set(admission.running);
    },
  });
  new Gauge({
    name: "vllm:kv_cache_usage_perc",
    help: "KV cache usage as a fraction (1 = full): the kvstore's host KV segment bytes in use over its capacity",
    registers: [registry],
    async collect() {
      const h = await hostKv();
      this.set(h.capacity > 0 ? h.used / h.capacity : 0);
    },
  });
  new Gauge({
    name: "freekv_compute_host_kv_bytes",
    help: "The kvstore's host KV memory (shared-memory segments) as compute sees it: in use and capacity (FREEKV_KVSTORE_CAPACITY_BYTES)",
    labelNames: ["state"],
    registers: [registry],
    async collect() {
      const h = await hostKv();
      this.set({ state: "used" }, h.used);
      this.set({ state: "capacity" }, h.capacity);
    },
  });

  return {
    requests: new Counter({ name: "freekv_generate_requests_total", help: "Generate calls by how they ended (a finish reason, the status code of a failed call, or write_stalled: the client stopped reading, FREEKV_WRITE_STALL_MS)", labelNames: ["finish"], registers: [registry] }),
    tokens: new Counter({ name: "freekv_generate_tokens_total", help: "Tokens through Generate: kind=prompt (prompt tokens) and kind=completion (generated tokens)", labelNames: ["kind"], registers: [registry] }),
    queueSeconds: new Histogram({ name: "freekv_generate_queue_seconds", help: "Time a Generate request waited in the admission queue", buckets: LATENCY, registers: [registry] }),
    timeToFirstToken: new Histogram({
      name: "freekv_generate_time_to_first_token_seconds",
      help: "Time from a Generate call's arrival to its first generated token (queue and prefill)",
      buckets: LATENCY,
      registers: [registry],
    }),
    timePerOutputToken: new Histogram({
      name: "freekv_generate_time_per_output_token_seconds",
      help: "Mean time between a Generate call's generated tokens after the first",
      buckets: PER_TOKEN,
      registers: [registry],
    }),
    e2eSeconds: new Histogram({ name: "freekv_generate_e2e_request_latency_seconds", help: "Time from a Generate call's arrival to its end (finished, failed or cancelled)", buckets: LATENCY, registers: [registry] }),
    prefillSeconds: new Histogram({
      name: "freekv_generate_prefill_seconds",
      help: "Prompt prefill time of a Generate call (from admission; the queue is freekv_generate_queue_seconds)",
      buckets: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1, 3, 10, 30],
      registers: [registry],
    }),
    prefillTokensPerSecond: new Histogram({
      name: "freekv_generate_prefill_tokens_per_second",
      help: "Prefill throughput of a Generate call: tokens prefilled over its prefill time (decode steps of other sessions interleaved included)",
      buckets: RATE,
      registers: [registry],
    }),
    decodeTokensPerSecond: new Histogram({
      name: "freekv_generate_decode_tokens_per_second",
      help: "Decode throughput of a Generate call: tokens generated after the first over the time since the first",
      buckets: RATE,
      registers: [registry],
    }),
  };
}
