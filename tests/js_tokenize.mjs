// Test helper: tokenize texts with examples/web/tokenizer.mjs, and render chat templates with
// examples/web/chat.mjs. stdin: {"kind", "file", "texts"} and/or {"chat_template", "cases": [{"messages",
// "add_generation_prompt", "vars"}]}; stdout: {"ids": [[...], ...], "decoded": [...], "streamed": [...]}
// (streamed: decoded token by token) and/or {"rendered": [text | {"error": message}], "stop": [...]}.
import fs from "node:fs";
import path from "node:path";

import { ChatTemplateError, chatTemplate } from "../examples/web/chat.mjs";
import { loadTokenizer } from "../examples/web/tokenizer.mjs";

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const out = {};
if (job.texts) {
  const read = async (name) => new Uint8Array(fs.readFileSync(path.join(path.dirname(job.file), name)));
  const tok = await loadTokenizer({ kind: job.kind, file: path.basename(job.file) }, read);
  out.ids = job.texts.map((t) => tok.encode(t));
  out.decoded = out.ids.map((x) => tok.decode(x));
  out.streamed = out.ids.map((x) => {
    const s = tok.stream();
    return x.map((i) => s.push(i)).join("") + s.flush();
  });
}
if (job.cases) {
  const t = chatTemplate({ chat_template: job.chat_template });
  out.stop = t ? t.stop : null;
  out.rendered = job.cases.map((c) => {
    try {
      return t.render(c.messages, { addGenerationPrompt: c.add_generation_prompt, ...(c.vars || {}) });
    } catch (e) {
      if (!(e instanceof ChatTemplateError)) throw e;
      return { error: e.message };
    }
  });
}
process.stdout.write(JSON.stringify(out) + "\n");
