/**
 * A chat template that raises on the messages it is given (roles that do not alternate, a system
 * message it does not support) refuses the request: INVALID_ARGUMENT on prompt.chat.messages in
 * the template's words, bounded, not an internal error. The tokenizer is the built-in model's;
 * the template is a Llama-2-style one that raises, written beside it in a temporary folder.
 */
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { status } from "@grpc/grpc-js";
import { loadTextCodec } from "../../services/compute/model/tokenizer.js";

const dir = mkdtempSync(join(tmpdir(), "freekv-template-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const TEMPLATE =
  "{% for message in messages %}" +
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
  "{{ '[' + message['role'] + '] ' + message['content'] + '\\n' }}" +
  "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}";

describe("chat template errors", () => {
  it("are the request's INVALID_ARGUMENT in the template's words; messages it takes render", () => {
    copyFileSync(join(import.meta.dirname, "..", "..", "models", "builtin", "tokenizer.json"), join(dir, "tokenizer.json"));
    writeFileSync(join(dir, "tokenizer_config.json"), JSON.stringify({ chat_template: TEMPLATE }));
    const codec = loadTextCodec(dir)!;
    expect(codec.hasChatTemplate).toBe(true);
    const ok = codec.encodeChat([
      { role: "user", content: "hello" },
      { role: "assistant", content: "hi" },
      { role: "user", content: "again" },
    ]);
    expect(ok.length).toBeGreaterThan(3);
    let err: { code?: number; message?: string } = {};
    try {
      codec.encodeChat([
        { role: "user", content: "hello" },
        { role: "user", content: "twice" },
      ]);
    } catch (e) {
      err = e as typeof err;
    }
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.message).toBe("prompt.chat.messages: the model's chat template refused the messages: Conversation roles must alternate user/assistant/user/assistant/...");
  });
});
