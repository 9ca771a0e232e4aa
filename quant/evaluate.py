"""Perplexity and bits per byte of a text, streamed through a model's recurrent state.

Memory stays constant however long the text: the file is read in pieces (cut after a newline, so
tokenization at the cuts is what it would be for the whole text, except for tokenizers that merge
across newlines), each piece is tokenized and fed in chunks through the prefill graph that returns
every position's logits; the state carries from chunk to chunk and piece to piece. Only one chunk's
logits and one piece of text are held at a time.

    nll       = -sum over predicted tokens of log p(token | everything before it)     (nats)
    ppl       = exp(nll / tokens predicted)
    bits/byte = nll / ln 2 / UTF-8 bytes of the predicted tokens (the text minus the first token's bytes)

Works for any model edgeseq.load returns (a bundle; a GGUF file once it loads through edgeseq.load).
"""
from __future__ import annotations

import codecs
import math
import os

import numpy as np

from edgeseq.errors import EdgeseqError
from edgeseq.tokenizer import ByteTokenizer

PIECE_BYTES = 1 << 20


def _pieces(path: str, piece_bytes: int):
    """UTF-8 text of the file, in pieces ending after a newline where there is one."""
    dec = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(piece_bytes)
                text = carry + dec.decode(raw, final=not raw)
                if not raw:
                    if text:
                        yield text
                    return
                cut = text.rfind("\n") + 1
                if cut == 0:
                    carry = text
                    continue
                carry = text[cut:]
                yield text[:cut]
    except UnicodeDecodeError as e:
        raise EdgeseqError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise EdgeseqError(f"{path}: cannot read ({e.strerror})") from None


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    mx = x.max(-1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(x - mx).sum(-1))
    return x[np.arange(len(targets)), targets] - lse


def evaluate_text(model, path: str, chunk: int = 256, max_tokens: int | None = None, progress: bool = False,
                  piece_bytes: int = PIECE_BYTES) -> dict:
    """Stream `path` through a fresh session of `model`. Returns tokens, bytes, nll, ppl, bpb."""
    if chunk < 1:
        raise EdgeseqError(f"chunk must be at least 1 token, not {chunk}")
    if not os.path.isfile(path):
        raise EdgeseqError(f"{path}: no such text file")
    tok = model.tokenizer
    sess = model.session()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc="eval", leave=False, disable=None)
    nll, n, nbytes, first_bytes = 0.0, 0, 0, None
    prev = None  # the last token fed: the next piece's first token is predicted from it
    done = False
    try:
        for text in _pieces(path, piece_bytes):
            ids = tok.encode(text)
            nbytes += len(text.encode("utf-8"))
            if bar is not None:
                bar.update(len(text.encode("utf-8")))
            if prev is None and ids:
                first_bytes = _token_bytes(tok, ids[0])
            seq = ([prev] if prev is not None else []) + list(ids)
            for a in range(0, len(seq) - 1, chunk):
                inp = seq[a:a + chunk]
                tgt = np.asarray(seq[a + 1:a + 1 + len(inp)])
                inp = inp[:len(tgt)]
                if max_tokens is not None and n + len(inp) > max_tokens:
                    inp, tgt = inp[:max_tokens - n], tgt[:max_tokens - n]
                    done = True
                if len(inp):
                    nll -= float(log_softmax_at(_all_logits(sess, inp), tgt).sum())
                    n += len(inp)
                    if done:
                        break
            if done:
                break
            if seq:
                prev = seq[-1]
    finally:
        if bar is not None:
            bar.close()
    if n == 0:
        raise EdgeseqError(f"{path}: needs at least two tokens")
    if done:
        # counted exactly when the text was cut short: the bytes of every predicted token
        nbytes = _predicted_bytes(model, path, n, piece_bytes)
    else:
        nbytes -= first_bytes or 0
    return {"tokens": n, "bytes": nbytes, "nll": nll, "nll_per_token": nll / n, "ppl": math.exp(nll / n),
            "bpb": nll / math.log(2) / max(nbytes, 1)}


def _predicted_bytes(model, path: str, n: int, piece_bytes: int) -> int:
    """UTF-8 bytes of tokens 2 .. n+1 of the text (re-tokenized piece by piece, as evaluate_text did)."""
    tok = model.tokenizer
    total, seen = 0, 0
    for text in _pieces(path, piece_bytes):
        ids = tok.encode(text)
        for t in ids:
            if 1 <= seen <= n:
                total += _token_bytes(tok, t)
            seen += 1
            if seen > n:
                return total
    return total


def _token_bytes(tok, token_id: int) -> int:
    """UTF-8 bytes one token stands for: 1 for a byte-level model (a lone byte of a multi-byte character
    does not decode on its own); otherwise the length of its decoded text."""
    if isinstance(tok, ByteTokenizer):
        return 1
    return len(tok.decode([token_id]).encode("utf-8"))


def _all_logits(sess, ids) -> np.ndarray:
    """Every position's logits: the prefill_all graph where the session has it; token by token through
    step() for engines without it (llama.cpp's session)."""
    if hasattr(sess, "logits_all"):
        return sess.logits_all(ids)
    return np.stack([np.asarray(sess.step(int(t))) for t in ids])


def compare_text(models: dict, path: str, chunk: int = 256, piece_bytes: int = PIECE_BYTES) -> dict:
    """Stream `path` once through several models of one tokenizer, in lockstep: {label: result}, each
    result as evaluate_text's plus `kl`, the mean KL(first model || this one) per predicted token in
    nats (the first model is the reference, e.g. f32). KL measures how far a quantized model's
    distributions moved, whatever the text; the perplexity change also depends on which way they moved
    on this text, so on a small model it swings with the rounding of a few weights."""
    if not models:
        raise EdgeseqError("compare_text: no models")
    labels = list(models)
    toks = [models[k].tokenizer for k in labels]
    sess = [models[k].session() for k in labels]
    nll = np.zeros(len(labels))
    kl = np.zeros(len(labels))
    n, nbytes, first_bytes, prev = 0, 0, None, None
    for text in _pieces(path, piece_bytes):
        ids = toks[0].encode(text)
        if any(t.encode(text) != ids for t in toks[1:]):
            raise EdgeseqError(f"compare_text: the models {', '.join(labels)} do not share a tokenizer")
        nbytes += len(text.encode("utf-8"))
        if prev is None and ids:
            first_bytes = _token_bytes(toks[0], ids[0])
        seq = ([prev] if prev is not None else []) + list(ids)
        for a in range(0, len(seq) - 1, chunk):
            inp = seq[a:a + chunk]
            tgt = np.asarray(seq[a + 1:a + 1 + len(inp)])
            inp = inp[:len(tgt)]
            ref = None
            for i, s in enumerate(sess):
                lp = _log_softmax(_all_logits(s, inp))
                nll[i] -= float(lp[np.arange(len(tgt)), tgt].sum())
                if ref is None:
                    ref = lp
                kl[i] += float((np.exp(ref) * (ref - lp)).sum())
            n += len(inp)
        if seq:
            prev = seq[-1]
    if n == 0:
        raise EdgeseqError(f"{path}: needs at least two tokens")
    nbytes -= first_bytes or 0
    return {k: {"tokens": n, "bytes": nbytes, "nll": nll[i], "nll_per_token": nll[i] / n,
                "ppl": math.exp(nll[i] / n), "bpb": nll[i] / math.log(2) / max(nbytes, 1), "kl": kl[i] / n}
            for i, k in enumerate(labels)}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
