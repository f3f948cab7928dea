/**
 * Text <-> token ids for a checkpoint folder: tokenizer.json through @huggingface/tokenizers and
 * the chat template of tokenizer_config.json through @huggingface/jinja. A folder without
 * tokenizer.json is served with token ids only.
 */
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Tokenizer } from "@huggingface/tokenizers";
import { Template } from "@huggingface/jinja";
import { invalidArgument } from "../../common/errors.js";
import { ModelConfigError, readJsonFile } from "./config.js";

/** Largest text (UTF-8 bytes) tokenized for one request (about 1 s of tokenizing on one core). */
export const MAX_TEXT_BYTES = 1 << 20;
/** The most messages one chat prompt renders (a conversation longer than this is summarized or cut by its client). */
export const MAX_CHAT_MESSAGES = 4096;
/** What a message's framing (role header, end-of-turn) counts against MAX_TEXT_BYTES before the template renders it. */
export const MESSAGE_OVERHEAD_BYTES = 32;

function checkTextSize(text: string, field: string, maxBytes: number): void {
  // UTF-16 length bounds the UTF-8 size within a factor of 3: the exact count only when it matters.
  if (text.length * 3 <= maxBytes) return;
  const bytes = Buffer.byteLength(text);
  if (bytes > maxBytes) throw invalidArgument(field, `${bytes} bytes of text exceed the limit of ${maxBytes}`);
}

export interface ChatMessage {
  role: string;
  content: string;
}

export class TextCodec {
  private readonly template?: Template;
  constructor(
    private readonly tokenizer: Tokenizer,
    private readonly config: Record<string, unknown>,
    chatTemplate?: string,
    /** The largest token id the tokenizer can produce (its vocabulary and added tokens). */
    readonly maxTokenId = -1,
  ) {
    if (chatTemplate !== undefined) this.template = new Template(chatTemplate);
  }

  get hasChatTemplate(): boolean {
    return !!this.template;
  }

  /**
   * Token ids of raw text; special tokens of the post-processor (BOS) are added when asked. Text
   * over MAX_TEXT_BYTES is refused (INVALID_ARGUMENT) before it is tokenized: tokenizing runs on
   * the event loop, and every call waits for it.
   */
  encode(text: string, addSpecialTokens = false, limit: { field?: string; maxBytes?: number } = {}): number[] {
    checkTextSize(text, limit.field ?? "prompt.text", limit.maxBytes ?? MAX_TEXT_BYTES);
    return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
  }

  decode(ids: number[], skipSpecialTokens = true): string {
    if (ids.length === 0) return ""; // the library refuses an empty list
    return this.tokenizer.decode(ids, { skip_special_tokens: skipSpecialTokens });
  }

  /**
   * Renders messages with the chat template (generation prompt appended) and encodes them. A turn
   * that continues a conversation already in the cache is rendered without the BOS text.
   */
  encodeChat(messages: ChatMessage[], continuing = false, maxBytes = MAX_TEXT_BYTES): number[] {
    if (!this.template) throw new Error("the model has no chat template (tokenizer_config.json chat_template)");
    if (messages.length > MAX_CHAT_MESSAGES) throw invalidArgument("prompt.chat.messages", `${messages.length} messages exceed the limit of ${MAX_CHAT_MESSAGES}`);
    // Each message counts its template's framing too (MESSAGE_OVERHEAD_BYTES): many empty ones
    // would otherwise render far more text than the limit before it is checked.
    let bytes = 0;
    for (const m of messages) bytes += Buffer.byteLength(m.content ?? "") + Buffer.byteLength(m.role ?? "") + MESSAGE_OVERHEAD_BYTES;
    if (bytes > maxBytes) throw invalidArgument("prompt.chat.messages", `${bytes} bytes of text (${MESSAGE_OVERHEAD_BYTES} a message for its framing) exceed the limit of ${maxBytes}`);
    let text: string;
    try {
      text = this.template.render({
        messages,
        add_generation_prompt: true,
        bos_token: continuing ? "" : tokenText(this.config.bos_token),
        eos_token: tokenText(this.config.eos_token),
      });
    } catch (e) {
      // Templates raise on messages they do not take (roles that do not alternate, a system
      // message they do not support): the request's problem, said in the template's words.
      throw invalidArgument("prompt.chat.messages", `the model's chat template refused the messages: ${(e as Error).message.slice(0, 512)}`);
    }
    return this.encode(text, false, { field: "prompt.chat.messages", maxBytes });
  }
}

function tokenText(v: unknown): string {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") return (v as { content: string }).content;
  return "";
}

/**
 * The folder's chat template, where transformers looks for it: `chat_template.jinja` (what
 * recent versions save), else tokenizer_config.json's `chat_template` as a string, or as a list of
 * named templates (the one named "default").
 */
function chatTemplateOf(dir: string, config: Record<string, unknown>): string | undefined {
  const jinja = join(dir, "chat_template.jinja");
  if (existsSync(jinja)) return readFileSync(jinja, "utf8");
  const t = config.chat_template;
  if (t === undefined || t === null) return undefined;
  if (typeof t === "string") return t;
  if (Array.isArray(t)) {
    const named = t.find((x) => x && typeof x === "object" && (x as { name?: unknown }).name === "default") as { template?: unknown } | undefined;
    if (named && typeof named.template === "string") return named.template;
    if (t.length === 0) return undefined;
  }
  throw new ModelConfigError(`${join(dir, "tokenizer_config.json")}: chat_template must be a string or a list of {name, template} with one named "default"`);
}

/** The largest id of a tokenizer.json's vocabulary (a map of pieces to ids, or a list of pieces) and added tokens. */
function maxTokenIdOf(tokenizerJson: Record<string, unknown>): number {
  let max = -1;
  const vocab = (tokenizerJson.model as { vocab?: unknown } | undefined)?.vocab;
  if (Array.isArray(vocab)) max = vocab.length - 1;
  else if (vocab && typeof vocab === "object") for (const id of Object.values(vocab)) if (typeof id === "number" && id > max) max = id;
  const added = tokenizerJson.added_tokens;
  if (Array.isArray(added)) for (const t of added) if (t && typeof t.id === "number" && t.id > max) max = t.id;
  return max;
}

/** Loads the folder's tokenizer, or undefined when it has no tokenizer.json. */
export function loadTextCodec(dir: string): TextCodec | undefined {
  const file = join(dir, "tokenizer.json");
  if (!existsSync(file)) return undefined;
  const tokenizerJson = readJsonFile(file) as Record<string, unknown>;
  if (!tokenizerJson || typeof tokenizerJson !== "object" || Array.isArray(tokenizerJson)) throw new ModelConfigError(`${file}: not a JSON object`);
  const cfgFile = join(dir, "tokenizer_config.json");
  const config = (existsSync(cfgFile) ? readJsonFile(cfgFile) : {}) as Record<string, unknown>;
  const template = chatTemplateOf(dir, config);
  try {
    return new TextCodec(new Tokenizer(tokenizerJson as never, config as never), config as never, template, maxTokenIdOf(tokenizerJson));
  } catch (e) {
    throw new ModelConfigError(`${file}: cannot build the tokenizer (${(e as Error).message})`);
  }
}
