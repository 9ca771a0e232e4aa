// The page: load a bundle with onnxruntime-web (WebGPU where the browser has an adapter, else wasm),
// tokenize the prompt in JavaScript, stream greedy text. URL parameters: bundle (URL of the bundle
// directory, default "/bundle/" as serve.py serves it), prompt, max_tokens, ep (webgpu | wasm), graph
// (decode graph: prefill | step), opt (ONNX Runtime graph optimization level; default all on wasm,
// disabled on WebGPU), autorun=1 (generate on load; the result is left in window.edgeseqResult for
// tests), logits=1 (the result also keeps every call's logits), chat=1 (the prompt is a user turn, rendered
// with the bundle's chat template by chat.mjs; the reply ends at the template's end-of-turn token).
import * as ort from "../node_modules/onnxruntime-web/dist/ort.all.min.mjs";
import { chatTemplate } from "./chat.mjs";
import { Bundle, greedy, withBos } from "./edgeseq.mjs";
import { loadTokenizer } from "./tokenizer.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
ort.env.wasm.wasmPaths = new URL("../node_modules/onnxruntime-web/dist/", import.meta.url).href;
// threads need a cross-origin-isolated page (COOP/COEP headers); one thread otherwise
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;

async function pickProvider() {
  const want = params.get("ep");
  if (want === "wasm") return "wasm";
  try {
    if (navigator.gpu && (await navigator.gpu.requestAdapter())) return "webgpu";
  } catch (e) {
    /* no adapter: wasm */
  }
  if (want === "webgpu") throw new Error("WebGPU was asked for, but this browser has no WebGPU adapter");
  return "wasm";
}

async function fetchBytes(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

let loaded = null; // {url, bundle, tokenizer, ep}

async function load(url) {
  if (loaded && loaded.url === url) return loaded;
  const base = new URL(url.endsWith("/") ? url : url + "/", location.href);
  const read = (name) => fetchBytes(new URL(name, base));
  const ep = await pickProvider();
  let weights = null; // fetched once, handed to every graph as its external data
  let bundle = null;
  const createSession = async (kind, file) => {
    const m = bundle.manifest; // sessions are created on first use, after the manifest is read
    // WebGPU: graph optimizations off by default (?opt= overrides): at level basic and up, onnxruntime-web
    // 1.30's WebGPU provider returns wrong state for RWKV-5's fused prefill graph (docs/embedding.md)
    const opt = params.get("opt") || (ep === "webgpu" ? "disabled" : "all");
    const options = { executionProviders: [ep], graphOptimizationLevel: opt };
    if (!m.weights.embedded) {
      // The graphs keep their weights in weights.bin (ONNX external data): onnxruntime-web cannot read
      // files, so the bytes are passed under the name the graphs use for them.
      weights ??= await read(m.weights.file);
      options.externalData = [{ path: m.weights.file, data: weights }];
    }
    return ort.InferenceSession.create(await read(file), options);
  };
  bundle = await Bundle.open(ort, read, createSession);
  const tokenizer = await loadTokenizer(bundle.manifest.tokenizer, read);
  loaded = { url, bundle, tokenizer, ep };
  const m = bundle.manifest;
  $("info").innerHTML = [
    ["family", `${m.family} (${m.architecture})`], ["flavour / quant", `${m.flavour} / ${m.quant.recipe}`],
    ["vocabulary", `${m.vocab_size} · tokenizer ${m.tokenizer.kind}`],
    ["state", `${(m.state_bytes_per_sequence / 1024).toFixed(1)} KiB per sequence, ${m.state.length} tensors`],
    ["weights", `${(m.weights.bytes / 1e6).toFixed(2)} MB`], ["execution provider", ep],
  ].map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("");
  return loaded;
}

async function generate() {
  $("go").disabled = true;
  const out = $("out");
  const result = { text: "", ids: [], error: null };
  try {
    $("status").textContent = "loading the bundle…";
    const { bundle, tokenizer, ep } = await load($("bundle").value);
    const template = $("chat").checked ? chatTemplate(bundle.manifest) : null; // none: plain text
    const promptText = template ? template.render([{ role: "user", content: $("prompt").value }]) : $("prompt").value;
    // an end-of-turn marker that is one token ends the reply
    const stopIds = template ? template.stop.map((s) => tokenizer.encode(s)).filter((x) => x.length === 1)
      .map((x) => x[0]) : [];
    const ids = withBos(bundle.manifest, tokenizer.encode(promptText)); // as Python does at position 0
    if (!ids.length) throw new Error("the prompt has no tokens");
    out.innerHTML = "";
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = promptText;
    const gen = document.createTextNode("");
    out.append(p, gen);
    // decode through the prefill graph: one session, so the weights are held once (?graph=step for the
    // step graph)
    const session = await bundle.newSession(params.get("graph") || "prefill");
    if (params.get("logits") === "1") { // for checks: keep every call's logits in the result
      result.logits = [];
      const run = session.run.bind(session);
      session.run = async (kind, ids) => {
        const l = await run(kind, ids);
        result.logits.push(Array.from(l));
        return l;
      };
    }
    const stream = tokenizer.stream();
    const max = Number($("max").value) || 64;
    const t0 = performance.now();
    let first = null;
    for await (const t of greedy(session, ids, max)) {
      first ??= performance.now();
      if (stopIds.includes(t)) break;
      result.ids.push(t);
      const piece = stream.push(t);
      result.text += piece;
      gen.data += piece;
      $("status").textContent = `${result.ids.length} tokens…`;
    }
    const tail = stream.flush();
    result.text += tail;
    gen.data += tail;
    const t1 = performance.now();
    const decode = result.ids.length > 1 ? ((result.ids.length - 1) / ((t1 - first) / 1000)).toFixed(1) : "–";
    $("status").textContent = `${ids.length} prompt tokens, ${result.ids.length} generated · ${ep} · ` +
      `first token ${(first - t0 || 0).toFixed(0)} ms (incl. session start) · decode ${decode} tok/s · greedy`;
    result.ep = ep;
    result.promptIds = ids;
  } catch (e) {
    result.error = String(e?.message ?? e);
    $("status").textContent = "error: " + result.error;
  }
  $("go").disabled = false;
  window.edgeseqResult = result;
  document.body.dataset.state = result.error ? "error" : "done";
  return result;
}

$("bundle").value = params.get("bundle") || "/bundle/"; // where serve.py mounts it
if (params.has("prompt")) $("prompt").value = params.get("prompt");
if (params.has("max_tokens")) $("max").value = params.get("max_tokens");
if (params.get("chat") === "1") $("chat").checked = true;
$("go").addEventListener("click", generate);
$("status").textContent = "ready";
if (params.get("autorun") === "1") generate();
