#!/usr/bin/env node
// Greedy decoding of an edgeseq ONNX bundle with onnxruntime-node, from the manifest alone.
//
//   node examples/node/generate.mjs BUNDLE --prompt-ids 1,2,3 --max-tokens 16
//   node examples/node/generate.mjs BUNDLE --prompt "Once upon a time" --max-tokens 32
//
// Prints the text as it streams (with --prompt) and, on its last line, the generated token ids as a
// JSON array (--logits-out FILE also writes every call's logits as JSON). The npm packages come from examples/package.json (`make test` or `npm ci` in examples/).
import fs from "node:fs";
import path from "node:path";
import process from "node:process";

import { Bundle, EdgeseqBundleError, greedy, withBos } from "../web/edgeseq.mjs";
import { loadTokenizer } from "../web/tokenizer.mjs";

function usage(msg) {
  if (msg) process.stderr.write(`error: ${msg}\n`);
  process.stderr.write("usage: node generate.mjs BUNDLE (--prompt-ids 1,2,3 | --prompt TEXT) [--max-tokens N] " +
    "[--threads N] [--max-context N] [--logits-out FILE]\n");
  process.exit(2);
}

function parseArgs(argv) {
  const a = { bundle: null, promptIds: null, prompt: null, maxTokens: 16, threads: 0, dims: {}, logitsOut: null };
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
  if ((a.promptIds === null) === (a.prompt === null)) usage("give exactly one of --prompt-ids and --prompt");
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
  if (args.prompt !== null) {
    const tok = await loadTokenizer(m.tokenizer, read);
    ids = withBos(m, tok.encode(args.prompt)); // as Python does at position 0
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
  for await (const t of greedy(session, ids, args.maxTokens)) {
    t1 ??= performance.now();
    out.push(t);
    if (stream) process.stdout.write(stream.push(t));
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
