"""Rows at different positions in one call, for every family with attention (`position` is int64
(batch,), one per row): three sequences of different lengths run alone (batch 1), then their states
stacked into one batch of three and fed on through the step and prefill graphs with their own
positions give each row's logits and state alone. This is what lets a server step every family's
sessions together (edgeseq serve). The reference models are the conformance suite's (tests/families.py)."""
from __future__ import annotations

import numpy as np
import pytest

import families
from conftest import PlainOrt

ATTENTION = [next(c.id for c in families.cases(f) if c.position) for f in ("zamba", "zamba2", "recurrent_gemma")]


@pytest.mark.parametrize("portable", [False, True], ids=["fused", "portable"])
@pytest.mark.parametrize("case_id", ATTENTION)
def test_rows_at_their_own_positions_equal_each_row_alone(case_id, portable, tmp_path_factory):
    built = families.built(case_id, tmp_path_factory)
    app = PlainOrt(built.bundle(portable=portable), max_context=16)  # rings wrap: lengths reach past 16
    ids = built.ids
    lengths = [3, 9, 21]
    rows = [app.steps(ids[:n]) for n in lengths]  # (logits, state) of each row alone
    state = {k: np.concatenate([s[k] for _, s in rows]) for k in rows[0][1]}
    position = np.array(lengths, np.int64)
    nxt = [ids[n] for n in lengths]  # each row's next token
    for kind, feed in (("step", [[t] for t in nxt]), ("prefill", [[t, 7, 11] for t in nxt])):
        g = app.manifest["graphs"][kind]
        outs = app.sessions[kind].run(g["outputs"], {"input_ids": np.asarray(feed, np.int64), "position": position,
                                                     **state})
        for r, n in enumerate(lengths):
            alone_logits, alone_state = app.run(kind, feed[r], rows[r][1], position=n)
            assert np.abs(outs[0][r] - alone_logits[0]).max() < 1e-5, (kind, r)
            for s, o in zip(app.spec, outs[1:]):
                assert np.abs(o[r] - alone_state[s["name"]][0]).max() < 1e-5, (kind, r, s["name"])
