#!/usr/bin/env node
// Greedy decoding of an edgeseq ONNX bundle with onnxruntime-node, from the manifest alone.
//
//   node examples/node/generate.mjs BUNDLE --prompt-ids 1,2,3 --max-tokens 16
//   node examples/node/generate.mjs BUNDLE --prompt "Once upon a time" --max-tokens 32
//   node examples/node/generate.mjs BUNDLE --chat "Who made the stars?" [--system TEXT]
//
// --chat renders one user turn (after --system's turn, if given) with the bundle's chat template
// (examples/web/chat.mjs: the checkpoint's Jinja template through @huggingface/jinja, as edgeseq's
// Python chat renders it) and ends the reply at the template's end-of-turn markers; a bundle without a
// template continues the text (--system first, on its own line), as `edgeseq chat` does.
//
// Prints the text as it streams (with --prompt) and, on its last line, the generated token ids as a
// JSON array (--logits-out FILE also writes every call's logits as JSON). The npm packages come from examples/package.json (`make test` or `npm ci` in examples/).
import fs from "node:fs";
import path from "node:path";
import process from "node:process";

import { chatTemplate } from "../web/chat.mjs";
import { Bundle, EdgeseqBundleError, greedy, withBos } from "../web/edgeseq.mjs";
import { loadTokenizer } from "../web/tokenizer.mjs";

function usage(msg) {
  if (msg) process.stderr.write(`error: ${msg}\n`);
  process.stderr.write("usage: node generate.mjs BUNDLE (--prompt-ids 1,2,3 | --prompt TEXT | --chat TEXT " +
    "[--system TEXT]) [--max-tokens N] [--threads N] [--max-context N] [--logits-out FILE]\n");
  process.exit(2);
}

function parseArgs(argv) {
  const a = { bundle: null, promptIds: null, prompt: null, chat: null, system: null, maxTokens: 16, threads: 0,
    dims: {}, logitsOut: null };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    const val = () => (i + 1 < argv.length ? argv[++i] : usage(`${k} needs a value`));
    if (k === "--prompt-ids") {
      a.promptIds = val().split(",").filter((s) => s.trim() !== "").map((s) => {
        const n = Number(s);
        if (!Number.isInteger(n) || n < 0) usage(`--prompt-ids: ${JSON.stringify(s)} is not a token id`);
        return n;
      });
    } else if (k === "--prompt") a.prompt = val();
    else if (k === "--chat") a.chat = val();
    else if (k === "--system") a.system = val();
    else if (k === "--max-tokens") a.maxTokens = Number(val());
    else if (k === "--threads") a.threads = Number(val());
    else if (k === "--max-context") a.dims.max_context = Number(val());
    else if (k === "--logits-out") a.logitsOut = val();
    else if (k === "-h" || k === "--help") usage();
    else if (k.startsWith("-")) usage(`unknown option ${k}`);
    else if (a.bundle === null) a.bundle = k;
    else usage(`unexpected argument ${k}`);
  }
  if (!a.bundle) usage("BUNDLE is required");
  if ([a.promptIds, a.prompt, a.chat].filter((x) => x !== null).length !== 1) {
    usage("give exactly one of --prompt-ids, --prompt and --chat");
  }
  if (a.system !== null && a.chat === null) usage("--system goes with --chat");
  if (!Number.isInteger(a.maxTokens) || a.maxTokens < 0) usage("--max-tokens must be a whole number");
  return a;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let ort;
  try {
    ort = (await import("onnxruntime-node")).default;
  } catch (e) {
    throw new EdgeseqBundleError(`onnxruntime-node is not installed (cd examples && npm ci): ${e.message}`);
  }
  const dir = args.bundle;
  const read = async (name) => {
    const p = path.join(dir, name);
    try {
      return new Uint8Array(fs.readFileSync(p));
    } catch (e) {
      throw new EdgeseqBundleError(`${p}: cannot read (${e.code || e.message})`);
    }
  };
  const options = { executionProviders: ["cpu"], graphOptimizationLevel: "all" };
  if (args.threads) options.intraOpNumThreads = args.threads;
  // onnxruntime-node reads each graph from its path, and the weights (ONNX external data) from the
  // file the graph names beside it: weights.bin.
  const createSession = (kind, file) => ort.InferenceSession.create(path.join(dir, file), options);
  let bundle;
  try {
    bundle = await Bundle.open(ort, read, createSession, { dims: args.dims });
  } catch (e) {
    if (e instanceof EdgeseqBundleError) throw new EdgeseqBundleError(`${dir}: ${e.message}`);
    throw e;
  }
  const m = bundle.manifest;
  let ids = args.promptIds;
  let stream = null;
  let stops = { ids: [], texts: [] };
  if (args.prompt !== null || args.chat !== null) {
    const tok = await loadTokenizer(m.tokenizer, read);
    let text = args.prompt;
    if (args.chat !== null) {
      const t = chatTemplate(m);
      const messages = args.system !== null ? [{ role: "system", content: args.system }] : [];
      messages.push({ role: "user", content: args.chat });
      text = t ? t.render(messages, { addGenerationPrompt: true })
        : (args.system !== null ? args.system + "\n" : "") + args.chat;
      if (t) { // a marker that is one token ends the reply as that token; any marker as text
        stops = { ids: t.stop.map((s) => tok.encode(s)).filter((x) => x.length === 1).map((x) => x[0]), texts: t.stop };
      }
    }
    ids = withBos(m, tok.encode(text)); // as Python does at position 0
    stream = tok.stream();
  }
  for (const t of ids) {
    if (t >= m.vocab_size) throw new EdgeseqBundleError(`token id ${t} is outside the vocabulary (0..${m.vocab_size - 1})`);
  }
  if (!ids.length) throw new EdgeseqBundleError("the prompt has no tokens");
  const session = await bundle.newSession();
  const logits = [];
  if (args.logitsOut) { // every call's logits, for checks
    const run = session.run.bind(session);
    session.run = async (kind, ids) => {
      const l = await run(kind, ids);
      logits.push(Array.from(l));
      return l;
    };
  }
  const out = [];
  const t0 = performance.now();
  let t1 = null;
  let said = "";
  for await (const t of greedy(session, ids, args.maxTokens)) {
    t1 ??= performance.now();
    if (stops.ids.includes(t)) break;
    out.push(t);
    if (!stream) continue;
    const piece = stream.push(t);
    const hit = stops.texts.map((s) => (said + piece).indexOf(s)).filter((i) => i >= 0);
    if (hit.length) { // the reply ends before the marker
      process.stdout.write((said + piece).slice(said.length, Math.min(...hit)));
      break;
    }
    said += piece;
    process.stdout.write(piece);
  }
  const t2 = performance.now();
  if (t1 !== null && out.length > 1) { // timings on stderr: prompt (with session creation) and decode
    process.stderr.write(`prompt ${ids.length} tokens in ${(t1 - t0).toFixed(0)} ms (incl. loading the graphs); ` +
      `decode ${((out.length - 1) / ((t2 - t1) / 1000)).toFixed(1)} tok/s\n`);
  }
  if (stream) process.stdout.write(stream.flush() + "\n");
  if (args.logitsOut) fs.writeFileSync(args.logitsOut, JSON.stringify(logits));
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((e) => {
  process.stderr.write(`error: ${e.message}\n`);
  process.exit(1);
});
