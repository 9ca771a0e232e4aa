// Drive an edgeseq ONNX bundle with ONNX Runtime for JavaScript (onnxruntime-node or onnxruntime-web),
// from its manifest (edgeseq.json) alone: no Python, no knowledge of the model family.
//
// The contract (schema/edgeseq.schema.json, docs/embedding.md):
//   - each graph of manifest.graphs lists its inputs and outputs by name; `tensors` gives the dtype and
//     shape of the ones that are not state (input_ids int64 (batch, tokens), logits float32, and for
//     families with attention `position`: int64 (1,), the absolute position of the call's first token);
//   - manifest.state lists every state tensor: input name, output name, shape (batch first), dtype and
//     initial value (RWKV-4's running maximum starts at -1e30); a state-tuned bundle's
//     `initial_state` file (safetensors) replaces some of those initial values;
//   - each call feeds the state and gets the next state back under the `output` names.
//
// The caller passes in the `ort` module and a `read(name)` function returning a file of the bundle as a
// Uint8Array (fs in Node, fetch in a browser), so this file runs in both.

export const FORMAT = "edgeseq-bundle";
// the newest bundle format this driver reads. 2: `chat_template` is the checkpoint's own Jinja template
// ({"jinja": ...}); this driver takes ids, as in format 1, and chat.mjs renders the template
export const FORMAT_VERSION = 2;

export class EdgeseqBundleError extends Error {}

export function parseManifest(text, where = "edgeseq.json") {
  let m;
  try {
    m = JSON.parse(text);
  } catch (e) {
    throw new EdgeseqBundleError(`${where}: damaged manifest (${e.message})`);
  }
  if (m.format !== FORMAT) throw new EdgeseqBundleError(`${where}: not an edgeseq bundle manifest`);
  if (!Number.isInteger(m.format_version) || m.format_version > FORMAT_VERSION) {
    throw new EdgeseqBundleError(`${where}: bundle format ${m.format_version} is newer than this driver reads ` +
      `(${FORMAT_VERSION})`);
  }
  return m;
}

// A state dim: an integer, "batch" (1 here), or a name the manifest defines at its top level
// (e.g. "max_context" for a full-attention ring; the caller may override it).
export function resolveDims(shape, manifest, overrides = {}) {
  return shape.map((d) => {
    if (Number.isInteger(d)) return d;
    if (d === "batch") return 1;
    const v = overrides[d] ?? manifest[d] ?? manifest.config?.[d];
    if (!Number.isInteger(v)) throw new EdgeseqBundleError(`edgeseq.json: state dim ${JSON.stringify(d)} is not defined`);
    return v;
  });
}

// safetensors: u64 header length (little-endian), JSON header {name: {dtype, shape, data_offsets}}, data.
export function readSafetensors(bytes, where = "initial_state.safetensors") {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (bytes.byteLength < 8) throw new EdgeseqBundleError(`${where}: truncated`);
  const n = Number(view.getBigUint64(0, true));
  if (8 + n > bytes.byteLength) throw new EdgeseqBundleError(`${where}: truncated header`);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + n)));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    if (t.dtype !== "F32") throw new EdgeseqBundleError(`${where}: ${name} is ${t.dtype}, expected F32`);
    const [a, b] = t.data_offsets;
    const raw = bytes.slice(8 + n + a, 8 + n + b); // a copy: aligned for Float32Array
    out[name] = { shape: t.shape, data: new Float32Array(raw.buffer, raw.byteOffset, (b - a) / 4) };
  }
  return out;
}

export class Bundle {
  // ort: the onnxruntime module; read(name) -> Promise<Uint8Array>; createSession(kind, file) ->
  // Promise<ort.InferenceSession> (Node: from the file path; web: from bytes with externalData).
  constructor(ort, manifest, { createSession, read, dims = {} }) {
    this.ort = ort;
    this.manifest = manifest;
    this._create = createSession;
    this._read = read;
    this._dims = dims;
    this._sessions = {};
    this._init = null;
  }

  static async open(ort, read, createSession, options = {}) {
    const text = new TextDecoder().decode(await read("edgeseq.json"));
    const m = parseManifest(text);
    const b = new Bundle(ort, m, { createSession, read, ...options });
    await b.initialState();
    return b;
  }

  async session(kind) {
    if (!this._sessions[kind]) {
      const g = this.manifest.graphs[kind];
      if (!g) throw new EdgeseqBundleError(`edgeseq.json: the bundle has no ${kind} graph`);
      this._sessions[kind] = await this._create(kind, g.file);
    }
    return this._sessions[kind];
  }

  // {input name: {dims, data: Float32Array}}: the declared initial values, then the tuned state file.
  async initialState() {
    if (this._init) return this._init;
    const init = {};
    for (const s of this.manifest.state) {
      if (s.dtype !== "float32") throw new EdgeseqBundleError(`edgeseq.json: ${s.name} has dtype ${s.dtype}`);
      const dims = resolveDims(s.shape, this.manifest, this._dims);
      const data = new Float32Array(dims.reduce((a, b) => a * b, 1));
      data.fill(s.init);
      init[s.name] = { dims, data };
    }
    const tuned = this.manifest.initial_state;
    if (tuned) {
      const t = readSafetensors(await this._read(tuned.file), tuned.file);
      for (const [name, { shape, data }] of Object.entries(t)) {
        if (!init[name] || init[name].data.length !== data.length) {
          throw new EdgeseqBundleError(`${tuned.file}: ${name} [${shape}] does not match the state spec`);
        }
        init[name].data = data;
      }
    }
    this._init = init;
    return init;
  }

  async newSession(decodeGraph = "step") {
    const s = new Session(this, decodeGraph);
    await s.reset();
    return s;
  }
}

export class Session {
  // decodeGraph: "step" (static shapes, no loops) or "prefill" (any length: one graph, and so one copy
  // of the weights in memory, serves prompt and decode, as the Python runtime does)
  constructor(bundle, decodeGraph = "step") {
    this.bundle = bundle;
    // a mobile bundle has the step graph only
    this.decodeGraph = bundle.manifest.graphs[decodeGraph] ? decodeGraph : "step";
    this.hasPrefill = "prefill" in bundle.manifest.graphs;
    // a full-attention KV ring (a state dim named "max_context") holds that many tokens; past it the
    // ring would wrap (a sliding window): this driver stops instead, as edgeseq does by default
    this.maxContext = bundle.manifest.state.some((s) => s.shape.includes("max_context"))
      ? resolveDims(["max_context"], bundle.manifest, bundle._dims)[0] : Infinity;
    this.ort = bundle.ort;
    this.spec = bundle.manifest.state;
    this.position = 0;
    this.state = {}; // input name -> ort.Tensor
  }

  async reset() {
    this._dispose(Object.values(this.state));
    const init = await this.bundle.initialState();
    this.state = {};
    for (const s of this.spec) {
      const { dims, data } = init[s.name];
      this.state[s.name] = new this.ort.Tensor("float32", data.slice(), dims);
    }
    this.position = 0;
  }

  // One call of a graph on `ids` from the current state; returns the logits (Float32Array, a copy) of
  // the last token (or of every token for prefill_all) and advances the state and the position.
  async run(kind, ids) {
    if (this.position + ids.length > this.maxContext) {
      throw new EdgeseqBundleError(`context full: ${this.maxContext} tokens (the bundle's max_context)`);
    }
    const g = this.bundle.manifest.graphs[kind];
    const sess = await this.bundle.session(kind);
    const ort = this.ort;
    const feeds = {};
    const owned = [];
    for (const name of g.inputs) {
      if (name === "input_ids") {
        feeds[name] = new ort.Tensor("int64", BigInt64Array.from(ids, (t) => BigInt(t)), [1, ids.length]);
        owned.push(feeds[name]);
      } else if (name === "position") {
        feeds[name] = new ort.Tensor("int64", BigInt64Array.of(BigInt(this.position)), [1]);
        owned.push(feeds[name]);
      } else if (name in this.state) {
        feeds[name] = this.state[name];
      } else {
        throw new EdgeseqBundleError(`edgeseq.json: graph ${kind} needs input ${name}, which the manifest does not describe`);
      }
    }
    const out = await sess.run(feeds, g.outputs);
    const logits = out.logits.data.slice();
    const old = Object.values(this.state);
    for (const s of this.spec) this.state[s.name] = out[s.output];
    this._dispose([...old, ...owned, out.logits]); // onnxruntime-web: outputs hold wasm/GPU memory
    this.position += ids.length;
    return logits;
  }

  // Feed a prompt in slices of the manifest's prefill chunk; one token goes through the step graph.
  async prefill(ids) {
    if (!ids.length) throw new EdgeseqBundleError("prefill needs at least one token");
    const chunk = this.hasPrefill ? this.bundle.manifest.graphs.prefill.chunk || 256 : 1;
    let logits;
    for (let a = 0; a < ids.length; a += chunk) {
      const part = ids.slice(a, a + chunk);
      logits = await this.run(part.length === 1 ? this.decodeGraph : "prefill", part);
    }
    return logits;
  }

  async step(id) {
    return this.run(this.decodeGraph, [id]);
  }

  _dispose(tensors) {
    for (const t of tensors) if (t && typeof t.dispose === "function") t.dispose();
  }
}

// A text prompt's ids as the model expects them at the start of a sequence: bos_token_id first when the
// manifest's add_bos says the model's own tokenizer does that (Gemma, Mistral-style SentencePiece)
export function withBos(manifest, ids) {
  const bos = manifest.bos_token_id;
  return manifest.add_bos && bos != null && ids.length && ids[0] !== bos ? [bos, ...ids] : ids;
}

export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

// Greedy decoding: yields token ids until maxTokens or a stop token (not yielded) of the manifest.
export async function* greedy(session, promptIds, maxTokens) {
  const stops = new Set(session.bundle.manifest.stop_token_ids || []);
  let logits = await session.prefill(promptIds);
  for (let i = 0; i < maxTokens; i++) {
    const next = argmax(logits);
    if (stops.has(next)) return;
    yield next;
    logits = await session.step(next);
  }
}
