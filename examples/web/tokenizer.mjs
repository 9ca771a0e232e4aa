// The tokenizers an edgeseq bundle can carry, in plain JavaScript (browser and Node), read from the
// bundle's own files only:
//   bytes       byte-level models (vocab 256): UTF-8 bytes are the ids
//   rwkv_world  rwkv_vocab_v20230424.txt: lines `id <Python str or bytes literal> byte_length`; encoding
//               takes the longest vocabulary entry matching the UTF-8 bytes at each position
//   hf          tokenizer.json (Hugging Face tokenizers): BPE and Unigram models with the pieces
//               SentencePiece conversions and GPT-2-style byte-level BPE use (normalizers NFC/NFKC/
//               Prepend/Replace/Lowercase/Strip, pre-tokenizers ByteLevel/Metaspace/Split/Whitespace/
//               Digits/Punctuation, decoders ByteLevel/Metaspace/ByteFallback/Replace/Fuse/Strip).
//               Anything else is a clear error naming the component.
// Every tokenizer has encode(text) -> ids and stream() -> {push(id) -> text, flush() -> text}; the
// stream never splits a UTF-8 character.

export class TokenizerError extends Error {}

const utf8 = new TextEncoder();

function byteStream(bytesOf) {
  const dec = new TextDecoder("utf-8", { fatal: false });
  return {
    push: (id) => dec.decode(bytesOf(id), { stream: true }),
    flush: () => dec.decode(),
  };
}

// ---------------------------------------------------------------------------------------------
// byte-level
// ---------------------------------------------------------------------------------------------

export class ByteTokenizer {
  encode(text) {
    return Array.from(utf8.encode(text));
  }
  stream() {
    return byteStream((id) => (id >= 0 && id < 256 ? Uint8Array.of(id) : new Uint8Array(0)));
  }
  decode(ids) {
    const s = this.stream();
    return ids.map((i) => s.push(i)).join("") + s.flush();
  }
}

// ---------------------------------------------------------------------------------------------
// RWKV World
// ---------------------------------------------------------------------------------------------

// A Python string or bytes literal as the vocabulary writes them: '...' / "..." / b'...' / b"..."
// with the escapes repr() produces. Returns the UTF-8 (str) or raw (bytes) bytes.
export function parsePyLiteral(src) {
  let i = 0;
  let isBytes = false;
  if (src[i] === "b") {
    isBytes = true;
    i++;
  }
  const q = src[i];
  if ((q !== "'" && q !== '"') || src[src.length - 1] !== q) throw new TokenizerError(`not a literal: ${src}`);
  const body = src.slice(i + 1, src.length - 1);
  const out = [];
  const pushChar = (cp) => {
    if (isBytes) {
      if (cp > 255) throw new TokenizerError(`non-byte in bytes literal: ${src}`);
      out.push(cp);
    } else out.push(...utf8.encode(String.fromCodePoint(cp)));
  };
  const simple = { n: 10, t: 9, r: 13, "\\": 92, "'": 39, '"': 34, a: 7, b: 8, f: 12, v: 11, 0: 0 };
  for (let j = 0; j < body.length; j++) {
    const c = body[j];
    if (c !== "\\") {
      const cp = body.codePointAt(j);
      if (cp > 0xffff) j++;
      pushChar(cp);
      continue;
    }
    const e = body[++j];
    if (e === "x" || e === "u" || e === "U") {
      const n = { x: 2, u: 4, U: 8 }[e];
      const hex = body.slice(j + 1, j + 1 + n);
      if (!/^[0-9a-fA-F]+$/.test(hex) || hex.length !== n) throw new TokenizerError(`bad escape in ${src}`);
      pushChar(parseInt(hex, 16));
      j += n;
    } else if (e in simple) pushChar(simple[e]);
    else throw new TokenizerError(`unknown escape \\${e} in ${src}`);
  }
  return Uint8Array.from(out);
}

const latin1 = (bytes) => {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return s;
};

export class RwkvWorldTokenizer {
  constructor(text, where = "rwkv_vocab_v20230424.txt") {
    this.idToBytes = new Map();
    this.lookup = new Map(); // latin1 string of the bytes -> id
    const lengths = new Set();
    text.split("\n").forEach((line, n) => {
      if (!line) return;
      const a = line.indexOf(" ");
      const b = line.lastIndexOf(" ");
      let bytes;
      const id = Number(line.slice(0, a));
      try {
        bytes = parsePyLiteral(line.slice(a + 1, b).trim());
      } catch (e) {
        throw new TokenizerError(`${where}:${n + 1}: not a vocabulary line (${e.message})`);
      }
      if (!Number.isInteger(id) || bytes.length !== Number(line.slice(b + 1))) {
        throw new TokenizerError(`${where}:${n + 1}: entry does not have the length it declares`);
      }
      this.idToBytes.set(id, bytes);
      this.lookup.set(latin1(bytes), id);
      lengths.add(bytes.length);
    });
    this.lengths = [...lengths].sort((x, y) => y - x);
  }
  encode(text) {
    const src = latin1(utf8.encode(text));
    const out = [];
    let i = 0;
    while (i < src.length) {
      let found = false;
      for (const n of this.lengths) {
        if (i + n > src.length) continue;
        const id = this.lookup.get(src.slice(i, i + n));
        if (id !== undefined) {
          out.push(id);
          i += n;
          found = true;
          break;
        }
      }
      if (!found) throw new TokenizerError(`byte ${src.charCodeAt(i)} is not in the RWKV vocabulary`);
    }
    return out;
  }
  stream() {
    return byteStream((id) => this.idToBytes.get(id) || new Uint8Array(0));
  }
  decode(ids) {
    const s = this.stream();
    return ids.map((i) => s.push(i)).join("") + s.flush();
  }
}

// ---------------------------------------------------------------------------------------------
// tokenizer.json
// ---------------------------------------------------------------------------------------------

// GPT-2's byte <-> printable character table (ByteLevel)
const BYTE_TO_CHAR = (() => {
  const keep = [];
  for (let b = 33; b <= 126; b++) keep.push(b);
  for (let b = 161; b <= 172; b++) keep.push(b);
  for (let b = 174; b <= 255; b++) keep.push(b);
  const table = new Array(256);
  let extra = 0;
  for (let b = 0; b < 256; b++) table[b] = String.fromCodePoint(keep.includes(b) ? b : 256 + extra++);
  return table;
})();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));
const GPT2_SPLIT = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

function unsupported(what, obj) {
  return new TokenizerError(`tokenizer.json: ${what} ${JSON.stringify(obj?.type ?? obj)} is not supported by this ` +
    "JavaScript tokenizer");
}

function patternOf(p) {
  if (p.String !== undefined) return new RegExp(p.String.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "gu");
  if (p.Regex !== undefined) return new RegExp(p.Regex, "gu");
  throw unsupported("pattern", p);
}

// SentencePiece's precompiled normalization map (nmt_nfkc and friends): a u32 length, a Darts
// double-array trie over UTF-8 bytes, then the replacement strings (NUL-terminated) the trie points to.
// As tokenizers applies it: per grapheme cluster (shorter than 6 bytes) the first prefix match replaces
// the whole cluster; otherwise each character is looked up alone.
function precompiled(b64) {
  const raw = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const view = new DataView(raw.buffer);
  const trieBytes = view.getUint32(0, true);
  const units = new Uint32Array(trieBytes / 4);
  for (let i = 0; i < units.length; i++) units[i] = view.getUint32(4 + 4 * i, true);
  const strings = raw.subarray(4 + trieBytes);
  const dec = new TextDecoder();
  const offset = (u) => (u >>> 10) << ((u & (1 << 9)) >>> 6);
  const label = (u) => u & ((1 << 31) | 0xff);
  const transform = (chunk) => {
    const key = utf8.encode(chunk);
    let pos = offset(units[0]);
    for (const c of key) {
      pos ^= c;
      const u = units[pos];
      if (label(u) !== c) return null;
      pos ^= offset(u);
      if ((u >>> 8) & 1) {
        const start = units[pos] & 0x7fffffff;
        let end = start;
        while (end < strings.length && strings[end] !== 0) end++;
        return dec.decode(strings.subarray(start, end));
      }
    }
    return null;
  };
  const graphemes = new Intl.Segmenter(undefined, { granularity: "grapheme" });
  return (s) => {
    let out = "";
    for (const { segment } of graphemes.segment(s)) {
      if (utf8.encode(segment).length < 6) {
        const t = transform(segment);
        if (t !== null) { out += t; continue; }
      }
      for (const ch of segment) out += transform(ch) ?? ch;
    }
    return out;
  };
}

function normalizer(n) {
  if (!n) return (s) => s;
  switch (n.type) {
    case "Precompiled": return n.precompiled_charsmap ? precompiled(n.precompiled_charsmap) : (s) => s;
    case "NFC": case "NFD": case "NFKC": case "NFKD": return (s) => s.normalize(n.type);
    case "Lowercase": return (s) => s.toLowerCase();
    case "Prepend": return (s) => (s ? n.prepend + s : s);
    case "Replace": { const re = patternOf(n.pattern); return (s) => s.replace(re, n.content); }
    case "Strip": return (s) => { if (n.strip_left) s = s.replace(/^\s+/u, ""); if (n.strip_right) s = s.replace(/\s+$/u, ""); return s; };
    case "Sequence": { const fs = n.normalizers.map(normalizer); return (s) => fs.reduce((x, f) => f(x), s); }
    default: throw unsupported("normalizer", n);
  }
}

// split a string by a regex into pieces per HF's SplitDelimiterBehavior
function splitBy(s, re, behavior, invert = false) {
  const parts = [];
  let last = 0;
  const matches = [...s.matchAll(re)].filter((m) => m[0].length > 0);
  if (invert) return matches.map((m) => m[0]);
  const spans = [];
  for (const m of matches) {
    if (m.index > last) spans.push([s.slice(last, m.index), false]);
    spans.push([m[0], true]);
    last = m.index + m[0].length;
  }
  if (last < s.length) spans.push([s.slice(last), false]);
  for (let i = 0; i < spans.length; i++) {
    const [text, isDelim] = spans[i];
    if (!isDelim) { parts.push(text); continue; }
    if (behavior === "Removed") continue;
    if (behavior === "Isolated") parts.push(text);
    else if (behavior === "MergedWithPrevious" && parts.length && !spans[i - 1]?.[1]) parts[parts.length - 1] += text;
    else if (behavior === "MergedWithNext" && i + 1 < spans.length && !spans[i + 1][1]) { spans[i + 1][0] = text + spans[i + 1][0]; }
    else if (behavior === "Contiguous" && parts.length && spans[i - 1]?.[1]) parts[parts.length - 1] += text;
    else parts.push(text);
  }
  return parts;
}

// a pre-tokenizer: (pieces, isFirstSection) -> pieces
function preTokenizer(p) {
  if (!p) return (pieces) => pieces;
  switch (p.type) {
    case "ByteLevel": return (pieces) => pieces.flatMap((s) => {
      if (p.add_prefix_space && !s.startsWith(" ")) s = " " + s;
      const words = p.use_regex === false ? [s] : (s.match(GPT2_SPLIT) || []);
      return words.map((w) => Array.from(utf8.encode(w), (b) => BYTE_TO_CHAR[b]).join(""));
    });
    case "Metaspace": return (pieces, first) => pieces.flatMap((s) => {
      s = s.replaceAll(" ", p.replacement);
      const scheme = p.prepend_scheme ?? (p.add_prefix_space === false ? "never" : "always");
      if ((scheme === "always" || (scheme === "first" && first)) && !s.startsWith(p.replacement)) s = p.replacement + s;
      if (p.split === false) return [s];
      const re = new RegExp(p.replacement.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "gu");
      return splitBy(s, re, "MergedWithNext");
    });
    case "Split": { const re = patternOf(p.pattern); return (pieces) => pieces.flatMap((s) => splitBy(s, re, p.behavior, p.invert)); }
    case "Whitespace": return (pieces) => pieces.flatMap((s) => s.match(/\w+|[^\w\s]+/gu) || []);
    case "WhitespaceSplit": return (pieces) => pieces.flatMap((s) => s.split(/\s+/u).filter(Boolean));
    case "Digits": return (pieces) => pieces.flatMap((s) => splitBy(s, p.individual_digits ? /\p{N}/gu : /\p{N}+/gu, "Isolated"));
    case "Punctuation": return (pieces) => pieces.flatMap((s) => splitBy(s, /\p{P}/gu, p.behavior || "Isolated"));
    case "Sequence": { const fs = p.pretokenizers.map(preTokenizer); return (pieces, first) => fs.reduce((x, f) => f(x, first), pieces); }
    default: throw unsupported("pre-tokenizer", p);
  }
}

function byteFallbackIds(vocab, s) {
  return Array.from(utf8.encode(s), (b) => {
    const id = vocab.get(`<0x${b.toString(16).toUpperCase().padStart(2, "0")}>`);
    if (id === undefined) throw new TokenizerError(`tokenizer.json: byte fallback token for ${b} missing`);
    return id;
  });
}

class BPE {
  constructor(m) {
    if (m.continuing_subword_prefix || m.end_of_word_suffix) throw unsupported("BPE with subword prefix/suffix", "BPE");
    this.vocab = new Map(Object.entries(m.vocab));
    this.ranks = new Map();
    m.merges.forEach((mg, i) => this.ranks.set(Array.isArray(mg) ? mg.join(" ") : mg, i));
    this.unk = m.unk_token;
    this.byteFallback = !!m.byte_fallback;
    this.ignoreMerges = !!m.ignore_merges;
    this.fuseUnk = !!m.fuse_unk;
    this.cache = new Map();
  }
  word(w) {
    if (this.cache.has(w)) return this.cache.get(w);
    let ids;
    if (this.ignoreMerges && this.vocab.has(w)) ids = [this.vocab.get(w)];
    else {
      let sym = Array.from(w);
      for (;;) {
        let best = -1;
        let bestRank = Infinity;
        for (let i = 0; i + 1 < sym.length; i++) {
          const r = this.ranks.get(sym[i] + " " + sym[i + 1]);
          if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
        }
        if (best < 0) break;
        const merged = sym[best] + sym[best + 1];
        const next = [];
        for (let i = 0; i < sym.length; i++) {
          // merge every occurrence of the best pair, left to right
          if (i + 1 < sym.length && sym[i] + " " + sym[i + 1] === sym[best] + " " + sym[best + 1]) { next.push(merged); i++; }
          else next.push(sym[i]);
        }
        sym = next;
      }
      ids = [];
      let lastUnk = false;
      for (const s of sym) {
        const id = this.vocab.get(s);
        if (id !== undefined) { ids.push(id); lastUnk = false; }
        else if (this.byteFallback) { ids.push(...byteFallbackIds(this.vocab, s)); lastUnk = false; }
        else if (this.unk !== null && this.unk !== undefined && this.vocab.has(this.unk)) {
          if (!(this.fuseUnk && lastUnk)) ids.push(this.vocab.get(this.unk));
          lastUnk = true;
        } else throw new TokenizerError(`tokenizer.json: ${JSON.stringify(s)} is not in the vocabulary and there is no unk token`);
      }
    }
    this.cache.set(w, ids);
    return ids;
  }
}

class Unigram {
  constructor(m) {
    this.pieces = new Map();
    let min = Infinity;
    m.vocab.forEach(([piece, score], id) => { this.pieces.set(piece, [id, score]); min = Math.min(min, score); });
    this.unkId = m.unk_id;
    this.unkScore = min - 10; // HF's unk penalty
    this.byteFallback = !!m.byte_fallback;
    this.vocab = new Map([...this.pieces].map(([p, [id]]) => [p, id]));
    this.maxLen = Math.max(...[...this.pieces.keys()].map((p) => Array.from(p).length));
  }
  word(w) {
    const chars = Array.from(w);
    const n = chars.length;
    const best = new Array(n + 1).fill(null);
    best[0] = { score: 0, from: -1, id: null };
    for (let i = 0; i < n; i++) {
      if (!best[i]) continue;
      let single = false;
      let piece = "";
      for (let j = i; j < Math.min(n, i + this.maxLen); j++) {
        piece += chars[j];
        const hit = this.pieces.get(piece);
        if (!hit) continue;
        if (j === i) single = true;
        const sc = best[i].score + hit[1];
        if (!best[j + 1] || sc > best[j + 1].score) best[j + 1] = { score: sc, from: i, id: hit[0] };
      }
      if (!single) {
        const sc = best[i].score + this.unkScore;
        if (!best[i + 1] || sc > best[i + 1].score) best[i + 1] = { score: sc, from: i, id: null };
      }
    }
    const spans = [];
    for (let k = n; k > 0; k = best[k].from) spans.push([best[k].from, k, best[k].id]);
    spans.reverse();
    const ids = [];
    let unkRun = "";
    const flushUnk = () => {
      if (!unkRun) return;
      if (this.byteFallback) ids.push(...byteFallbackIds(this.vocab, unkRun));
      else {
        if (this.unkId === null || this.unkId === undefined) throw new TokenizerError("tokenizer.json: unknown piece and no unk_id");
        ids.push(this.unkId);
      }
      unkRun = "";
    };
    for (const [a, b, id] of spans) {
      if (id === null) { if (this.byteFallback) { unkRun = chars.slice(a, b).join(""); flushUnk(); } else unkRun += chars.slice(a, b).join(""); }
      else { flushUnk(); ids.push(id); }
    }
    flushUnk();
    return ids;
  }
}

// a decoder: list of token strings -> list of strings/bytes (Uint8Array) to join
function decoder(d) {
  if (!d) return (toks) => toks;
  switch (d.type) {
    case "ByteLevel": return (toks) => toks.map((t) => typeof t === "string" && [...t].every((c) => CHAR_TO_BYTE.has(c))
      ? Uint8Array.from([...t], (c) => CHAR_TO_BYTE.get(c)) : t);
    case "Metaspace": return (toks, first) => toks.map((t, i) => {
      if (typeof t !== "string") return t;
      let s = t.replaceAll(d.replacement, " ");
      const scheme = d.prepend_scheme ?? (d.add_prefix_space === false ? "never" : "always");
      if (i === 0 && first && scheme !== "never" && s.startsWith(" ")) s = s.slice(1);
      return s;
    });
    case "ByteFallback": return (toks) => toks.map((t) => {
      const m = typeof t === "string" && /^<0x([0-9A-Fa-f]{2})>$/.exec(t);
      return m ? Uint8Array.of(parseInt(m[1], 16)) : t;
    });
    case "Replace": { const re = patternOf(d.pattern); return (toks) => toks.map((t) => (typeof t === "string" ? t.replace(re, d.content) : t)); }
    case "Fuse": return (toks) => toks; // joining happens at the end anyway
    case "Strip": return (toks, first) => toks.map((t, i) => {
      if (typeof t !== "string") return t;
      if (d.start && i === 0 && first) t = t.slice(Math.min(d.start, t.startsWith(d.content) ? d.start : 0));
      return t;
    });
    case "Sequence": { const fs = d.decoders.map(decoder); return (toks, first) => fs.reduce((x, f) => f(x, first), toks); }
    default: throw unsupported("decoder", d);
  }
}

export class HFTokenizer {
  constructor(json) {
    const t = typeof json === "string" ? JSON.parse(json) : json;
    const type = t.model?.type ?? (t.model?.merges ? "BPE" : undefined);
    if (type === "BPE") this.model = new BPE(t.model);
    else if (type === "Unigram") this.model = new Unigram(t.model);
    else throw unsupported("model", t.model);
    this.normalize = normalizer(t.normalizer);
    this.preTokenize = preTokenizer(t.pre_tokenizer);
    this.decodeTokens = decoder(t.decoder);
    this.added = (t.added_tokens || []).slice().sort((a, b) => b.content.length - a.content.length);
    this.idToToken = new Map([...this.model.vocab].map(([s, id]) => [id, s]));
    for (const a of this.added) this.idToToken.set(a.id, a.content);
    this.addedIds = new Set(this.added.map((a) => a.id));
  }
  encode(text) {
    // added tokens are matched in the raw text first; the rest goes through the pipeline
    const sections = [];
    let rest = text;
    while (rest.length) {
      let at = -1;
      let tok = null;
      for (const a of this.added) {
        const i = rest.indexOf(a.content);
        if (i >= 0 && (at < 0 || i < at)) { at = i; tok = a; }
      }
      if (!tok) { sections.push(rest); break; }
      if (at > 0) sections.push(rest.slice(0, at));
      sections.push(tok);
      rest = rest.slice(at + tok.content.length);
    }
    const ids = [];
    sections.forEach((s, i) => {
      if (typeof s !== "string") { ids.push(s.id); return; }
      const pieces = this.preTokenize([this.normalize(s)], i === 0);
      for (const p of pieces) if (p) ids.push(...this.model.word(p));
    });
    return ids;
  }
  // the bytes (or text) each token contributes, through the decoder chain
  _parts(ids, first) {
    const toks = ids.map((id) => this.idToToken.get(id) ?? "");
    return this.decodeTokens(toks, first);
  }
  decode(ids) {
    const s = this.stream();
    return ids.map((i) => s.push(i)).join("") + s.flush();
  }
  stream() {
    const dec = new TextDecoder("utf-8");
    let first = true;
    return {
      push: (id) => {
        const parts = this._parts([id], first);
        first = false;
        let out = "";
        for (const p of parts) {
          // text parts flush any pending bytes first: a partial character before them is malformed
          out += typeof p === "string" ? dec.decode() + p : dec.decode(p, { stream: true });
        }
        return out;
      },
      flush: () => dec.decode(),
    };
  }
}

// spec: the manifest's `tokenizer`; read(name) -> Promise<Uint8Array>
export async function loadTokenizer(spec, read) {
  if (spec.kind === "bytes") return new ByteTokenizer();
  const text = new TextDecoder().decode(await read(spec.file));
  if (spec.kind === "rwkv_world") return new RwkvWorldTokenizer(text, spec.file);
  if (spec.kind === "hf") return new HFTokenizer(text);
  throw new TokenizerError(`edgeseq.json: unknown tokenizer kind ${JSON.stringify(spec.kind)} (known: hf, rwkv_world, bytes)`);
}
