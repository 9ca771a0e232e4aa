// Test helper: tokenize texts with examples/web/tokenizer.mjs. stdin: {"kind", "file", "texts"};
// stdout: {"ids": [[...], ...], "decoded": [...], "streamed": [...]} (streamed: decoded token by token).
import fs from "node:fs";
import path from "node:path";

import { loadTokenizer } from "../examples/web/tokenizer.mjs";

const job = JSON.parse(fs.readFileSync(0, "utf8"));
const read = async (name) => new Uint8Array(fs.readFileSync(path.join(path.dirname(job.file), name)));
const tok = await loadTokenizer({ kind: job.kind, file: path.basename(job.file) }, read);
const ids = job.texts.map((t) => tok.encode(t));
const decoded = ids.map((x) => tok.decode(x));
const streamed = ids.map((x) => {
  const s = tok.stream();
  return x.map((i) => s.push(i)).join("") + s.flush();
});
process.stdout.write(JSON.stringify({ ids, decoded, streamed }) + "\n");
