/**
 * Exact attention in float64, the reference the Attention stream is checked against:
 * out[h] = softmax(q[h] . K[:, g(h)] / sqrt(D)) V[:, g(h)], g(h) = h / (Hq / Hkv) (GQA).
 * One implementation, shared with the demo's check of what came back over the wire.
 */
export { exactAttention, relativeError } from "../../tools/dev/exact-attention.js";
