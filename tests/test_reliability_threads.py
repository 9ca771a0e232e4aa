"""One loaded model shared by several sessions in several threads: each session gives, token for token and
logit for logit, what it gives alone (ONNX Runtime's `run` is thread-safe; every session owns its state
arena and position, and the model's lazily created engine sessions are shared)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import edgeseq
from fuzz import seeds as seeds_mod

PROMPTS = [[1, 2, 3], [10, 20, 30, 40], [200, 5], [7] * 9, [99, 98, 97, 96, 95, 94]]
STEPS = 24


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return seeds_mod.build_all(tmp_path_factory.mktemp("seeds"))["bundle"]


def greedy(session, prompt):
    """Greedy tokens and every logits vector after the prompt, through prefill, step and a fork."""
    logits = session.prefill(prompt)
    toks, seen = [], [logits.copy()]
    for i in range(STEPS):
        t = int(np.argmax(logits))
        toks.append(t)
        if i == STEPS // 2:  # a fork mid-run continues as the original would
            session = session.fork()
        logits = session.step(t)
        seen.append(logits.copy())
    return toks, np.stack(seen)


def test_sessions_in_threads_give_their_solo_output(bundle):
    model = edgeseq.load(str(bundle))
    solo = [greedy(model.session(), p) for p in PROMPTS]
    fresh = edgeseq.load(str(bundle))  # engine sessions created under contention, too
    results, errors = {}, []
    barrier = threading.Barrier(len(PROMPTS) * 2)

    def work(k, i):
        try:
            barrier.wait()
            results[k] = greedy(fresh.session(), PROMPTS[i])
        except Exception as e:  # reported below, with the thread that raised it
            errors.append((k, repr(e)))
    threads = [threading.Thread(target=work, args=((i, r), i)) for i in range(len(PROMPTS)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for (i, _), (toks, logits) in results.items():
        assert toks == solo[i][0], i
        np.testing.assert_allclose(logits, solo[i][1], rtol=0, atol=1e-5)
    assert len(results) == len(PROMPTS) * 2
