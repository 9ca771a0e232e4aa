"""runtime/sampling.py against the plain definition of each rule, written here with numpy's own tools:
temperature, top-k, min-p and top-p (a full descending sort) over float64 probabilities, the draw by
`Generator.choice(p.size, p=p)`. The same seed must give the same tokens (the sampler's shortcuts, float32
weights, top-k as a gather of the k candidates, a partial sort for top-p and the draw through block sums
without choice's checks, change nothing), and the rules must act: top-k never draws outside the k largest,
top-p outside the nucleus."""
from __future__ import annotations

import numpy as np
import pytest

from edgeseq.runtime.sampling import Sampler, SamplingOptions


def reference(logits, o: SamplingOptions, rng, history) -> int:
    x = np.array(logits, dtype=np.float64)
    if o.repetition_penalty != 1.0 and history:
        seen = np.unique(np.asarray(history))
        x[seen] = np.where(x[seen] > 0, x[seen] / o.repetition_penalty, x[seen] * o.repetition_penalty)
    if o.temperature <= 0:
        return int(np.argmax(x))
    x = x / o.temperature
    if 0 < o.top_k < x.size:
        x[x < np.sort(x)[-o.top_k]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if o.min_p > 0:
        p[p < o.min_p * p.max()] = 0
        p /= p.sum()
    if o.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), o.top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(p.size, p=p))


@pytest.mark.parametrize("trial", range(40))
def test_same_seed_same_tokens_as_the_plain_rules(trial):
    rng = np.random.default_rng(trial)
    vocab = 50280 if trial % 4 == 0 else int(rng.integers(2, 5000))
    logits = (rng.standard_normal(vocab) * rng.uniform(0.2, 6)).astype(np.float32)
    o = SamplingOptions(temperature=float(rng.uniform(0.2, 1.5)), top_k=int(rng.choice([0, 0, 1, 7, 40, vocab + 1])),
                        top_p=float(rng.choice([1.0, 0.05, 0.5, 0.9, 0.999])), min_p=float(rng.choice([0.0, 0.05])),
                        repetition_penalty=float(rng.choice([1.0, 1.3])), seed=trial)
    history = [int(t) for t in rng.integers(0, vocab, 12)]
    ours, ref_rng = Sampler(o), np.random.default_rng(trial)
    got = [ours(logits, history) for _ in range(8)]
    want = [reference(logits, o, ref_rng, history) for _ in range(8)]
    assert got == want


def test_top_k_and_top_p_keep_to_their_tokens():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32) * 4
    top5 = set(np.argsort(-logits)[:5].tolist())
    s = Sampler(SamplingOptions(temperature=1.0, top_k=5, seed=1))
    assert {s(logits) for _ in range(300)} <= top5
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(p[order]), 0.6) + 1)].tolist())
    s = Sampler(SamplingOptions(temperature=1.0, top_p=0.6, seed=2))
    drawn = {s(logits) for _ in range(400)}
    assert drawn <= nucleus and len(drawn) > 1


@pytest.mark.parametrize("vocab", [1, 255, 256, 257, 50280])
def test_the_block_walk_draws_what_choice_draws(vocab):
    """_draw finds the token through sums of 256-token blocks; for every uniform it must pick what
    Generator.choice's cumulative sum picks, with zero weights (masked tokens) in and across blocks."""
    from edgeseq.runtime.sampling import _draw

    rng = np.random.default_rng(vocab)
    w = np.exp(rng.standard_normal(vocab) * 3).astype(np.float32)
    w[rng.random(vocab) < 0.5] = 0.0
    w[-1] = 0.0 if vocab > 1 else 1.0
    cdf = np.cumsum(w.astype(np.float64))
    cdf /= cdf[-1]
    for u in np.concatenate([rng.random(2000), cdf[:-1][w[:-1] > 0][:50], [0.0, np.nextafter(1.0, 0.0)]]):
        want = int(cdf.searchsorted(u, side="right"))
        got = _draw(w, float(u))
        assert w[got] > 0 and (got == want or abs(cdf[got] - u) < 1e-12 or abs(cdf[got - 1] - u) < 1e-12)
