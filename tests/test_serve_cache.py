"""The server's state cache and batched rows, in process, for every family (edgeseq/serve/cache.py, rows.py).

Models: the golden bundles of tests/data/golden/ (one tiny bundle per family, read only), whose recorded
logits of IDS were checked against each family's reference (HF transformers, the rwkv package) when they
were written; a resumed state must give those logits and a cold prefill's within 1e-4. And the server's
malloc setting (serve/malloc.py), which keeps freed states out of the heap.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeseq
from conftest import TOL, export_bundle, max_diff
from edgeseq.serve.cache import StateCache, prefix_hashes
from edgeseq.serve.rows import BatchRows, SingleRows, per_row_positions

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
FAMILIES = ["mamba", "falcon-mamba", "mamba2", "rwkv4", "rwkv5", "rwkv6", "rwkv7", "zamba", "zamba2",
            "recurrent_gemma"]


def golden(name):
    e = json.loads((GOLDEN / name / "expected.json").read_text())
    model = edgeseq.load(str(GOLDEN / name / "bundle"), **e["load"])
    return model, e["ids"], np.asarray(e["logits"]["steps"], np.float32)


_FRESH: dict = {}


def fresh(name, tmp_path_factory):
    """The golden case's checkpoint exported by today's code (the golden bundles of the attention families
    predate per-row positions: their graphs take one position for every row)."""
    import make_golden

    if name not in _FRESH:
        case = make_golden.CASES[name]
        work = tmp_path_factory.mktemp(f"serve-{name}")
        _FRESH[name] = export_bundle(case.build(work), work / "bundle", **case.export_kwargs())
    _, ids, ref = golden(name)
    e = json.loads((GOLDEN / name / "expected.json").read_text())
    return edgeseq.load(str(_FRESH[name]), **e["load"]), ids, ref


@pytest.mark.parametrize("name", FAMILIES)
def test_resumed_state_equals_cold_prefill(name, tmp_path):
    """A state cached after a turn (ids[:3]) and after the next (ids[:5]) resumes the longest prefix of a
    longer prompt; the logits equal a cold prefill of the whole prompt and the recorded reference."""
    model, ids, ref = golden(name)
    cache = StateCache(model, 64 << 20)
    s = model.session()
    for cut in (3, 5):
        s.reset()
        lg = s.prefill(ids[:cut])
        cache.put(ids[:cut], s.state(), s.position, lg)
    e = cache.lookup(ids)
    assert e is not None and len(e.ids) == 5 and e.position == 5
    r = model.session()
    r.set_state(e.arrays, e.position, e.logits)
    resumed = r.prefill(ids[5:])
    cold = model.session().prefill(ids)
    assert max_diff(resumed, cold) < TOL
    assert max_diff(resumed, ref[-1]) < TOL
    # a prompt that is exactly a cached prefix resumes with that entry's logits, nothing to feed
    whole = cache.lookup(ids[:5])
    assert len(whole.ids) == 5 and max_diff(whole.logits, ref[4]) < TOL
    # a prompt that parts from the cached ones after 3 tokens reuses those 3 (the longest common prefix)
    other = ids[:3] + [(ids[3] + 1) % 64] + ids[4:]
    assert len(cache.lookup(other).ids) == 3
    assert cache.lookup([(ids[0] + 1) % 64] + ids[1:]) is None


@pytest.mark.parametrize("name", ["mamba", "rwkv7", "zamba"])
def test_spill_to_disk_and_restart(name, tmp_path):
    """Out of RAM, an entry is a state file in the cache folder; a new cache (a restarted server) finds it,
    and resuming from it gives the reference logits. Entries from disk carry no logits, so they resume
    only longer prompts."""
    model, ids, ref = golden(name)
    s = model.session()
    lg = s.prefill(ids[:4])
    one = sum(a.nbytes for a in s.state().values()) + 4 * 4 + lg.nbytes
    cache = StateCache(model, int(one * 1.5), str(tmp_path))
    cache.put(ids[:4], s.state(), s.position, lg)
    s.reset()
    cache.put(ids[:2], {k: v.copy() for k, v in model.session().state().items()}, 0, None)  # pushes ids[:4] out
    assert cache.evictions == 1 and len(cache.disk) == 1
    files = sorted(p.suffix for p in (tmp_path / model.weights_sha256[:16]).iterdir())
    assert files == [".ids", ".state"]
    again = StateCache(model, 64 << 20, str(tmp_path))
    assert again.lookup(ids[:4]) is None  # the whole prompt: a disk entry has no logits to continue from
    e = again.lookup(ids)
    assert e is not None and len(e.ids) == 4 and again.disk_reads == 1
    r = model.session()
    r.set_state(e.arrays, e.position)
    assert max_diff(r.prefill(ids[4:]), ref[-1]) < TOL
    # a damaged file is dropped, not resumed
    state = next((tmp_path / model.weights_sha256[:16]).glob("*.state"))
    data = bytearray(state.read_bytes())
    data[-40] ^= 0xFF
    state.write_bytes(bytes(data))
    third = StateCache(model, 64 << 20, str(tmp_path))
    assert third.lookup(ids) is None and not third.disk


def test_lru_under_the_byte_budget():
    model, ids, _ = golden("mamba")
    st = model.session().state()
    one = sum(a.nbytes for a in st.values())
    cache = StateCache(model, one * 3 + 200)
    for n in range(1, 6):
        cache.put(ids[:n], {k: v.copy() for k, v in st.items()}, n, None)
        assert cache.used <= cache.ram_bytes
    assert cache.entries == 3 and cache.evictions == 2
    assert cache.lookup(ids[:2] + [63]) is None  # ids[:1] and ids[:2] went first
    assert len(cache.lookup(ids).ids) == 5


def test_prefix_hashes_are_positional():
    a, b = prefix_hashes([1, 2, 3]), prefix_hashes([2, 1, 3])
    assert a[0] == b[0] and a[1] != b[1] and a[3] != b[3] and len(a) == 4


@pytest.mark.parametrize("name", ["mamba", "falcon-mamba", "mamba2", "mamba2-int4", "rwkv4", "rwkv5", "rwkv6", "rwkv7"])
def test_batched_rows_equal_single_rows(name):
    """Rows at different positions step together through the batch axis; each row's logits equal its
    own session's within 1e-4, while rows join and leave (the last row moves into a freed slot)."""
    model, ids, ref = golden(name)
    rows = BatchRows(model, 4)
    solo = []
    for k in range(3):  # three sequences: the prefixes ids[:2], ids[:3], ids[:4]
        s = model.session()
        s.prefill(ids[:2 + k])
        rows.add(k, s.state(), s.position, None)
        solo.append(s)
    feed = [ids[2], ids[3], ids[4]]
    for step in range(3):
        got = rows.step(feed)
        for i, owner in enumerate(rows.owners):
            want = solo[owner].step(feed[i])
            assert max_diff(got[i], want) < TOL, (name, step, owner)
        if step == 0:
            rows.remove(0)  # row 0 leaves: row 2 moves into its slot
            assert rows.owners == [2, 1]
            feed = [5, 6]
        else:
            feed = [7, 8][:len(rows.owners)]
    # the sequence fed ids[:4] then ids[4] matches the recorded reference at that point
    fresh = BatchRows(model, 2)
    s = model.session()
    s.prefill(ids[:4])
    fresh.add("x", s.state(), 4, None)
    assert max_diff(fresh.step([ids[4]])[0], ref[4]) < TOL


@pytest.mark.parametrize("name", ["zamba", "zamba2", "recurrent_gemma"])
def test_attention_rows_at_their_own_positions_batch(name, tmp_path_factory):
    """Bundles with one position per row: rows at different positions step together, each equal to its
    own session; Zamba's rows stop at their full KV ring (None) and keep the state they had, the others
    going on in the same steps."""
    model, ids, ref = fresh(name, tmp_path_factory)
    assert per_row_positions(model)
    rows = BatchRows(model, 3)
    solo = []
    for k, n in enumerate((2, 5, 3)):
        s = model.session()
        s.prefill(ids[:n])
        rows.add(k, s.state(), s.position, None)
        solo.append(s)
    for step in range(8):
        kept = {owner: rows.state(owner) for owner in rows.owners}
        got = rows.step([(step * 7 + i) % 64 for i in range(len(rows.owners))])
        for i, owner in enumerate(list(rows.owners)):
            t = (step * 7 + i) % 64
            s = solo[owner]
            if model.max_context and s.position + 1 > model.max_context:
                assert got[i] is None, (name, step, owner)
                # the row keeps exactly the state it had, which is its own session's (to float32 rounding:
                # a batched MatMul may sum in another order than a single row's)
                after = rows.state(owner)
                assert all(np.array_equal(kept[owner][k], v) for k, v in after.items())
                assert all(max_diff(v, s.state()[k]) < TOL for k, v in after.items())
                rows.remove(owner)
                continue
            assert got[i] is not None and max_diff(got[i], s.step(t)) < TOL, (name, step, owner)
    if name == "zamba":  # max_context 12: the row that began at 5 filled its ring after 7 steps, the 8th stopped it
        assert 1 not in rows.owners


@pytest.mark.parametrize("name", ["zamba", "recurrent_gemma"])
def test_single_rows_for_attention_families(name):
    """Bundles exported before per-row positions: one session per row, stepped in turn."""
    model, ids, ref = golden(name)
    assert not per_row_positions(model)
    rows = SingleRows(model, 2)
    for k in range(2):
        s = rows.session()
        s.prefill(ids[:3 + k])
        rows.add(k, None, s.position, None, session=s)
    got = rows.step([ids[3], ids[4]])
    assert max_diff(got[0], ref[3]) < TOL and max_diff(got[1], ref[4]) < TOL
    rows.remove(0)
    assert rows.owners == [1] and len(rows.free) == 1


# -- the scheduler, in process ------------------------------------------------------------------------

def run_requests(model, reqs, parallel=4, timeout=600.0):
    """Submit every request to a running scheduler at once; returns each one's events when all ended."""
    import threading

    from edgeseq.serve.metrics import Metrics
    from edgeseq.serve.scheduler import Request, Scheduler

    sched = Scheduler(model, StateCache(model, 64 << 20), parallel, 16, Metrics(), timeout)
    done = threading.Semaphore(0)
    out = []
    for kw in reqs:
        events = []

        def emit(ev, events=events):
            events.append(ev)
            if ev[0] in ("end", "error"):
                done.release()

        out.append(events)
        sched.submit(Request(emit=emit, temperature=0, ends=set(model.stop_token_ids), **kw))
    sched.start()
    for _ in reqs:
        assert done.acquire(timeout=60)
    sched.stop()
    return out, sched


def texts(events, n=1):
    got = [""] * n
    for ev in events:
        if ev[0] == "text":
            got[ev[1]] += ev[2]
    return got


@pytest.mark.parametrize("name", ["mamba2", "rwkv6", "zamba", "recurrent_gemma", "zamba-fresh",
                                  "recurrent_gemma-fresh"])
def test_scheduler_equals_sessions(name, tmp_path_factory):
    """Requests decoded together (batched rows; the attention families' older bundles one row per step),
    with n = 2 forks and a cache hit, give what each alone gives in a session; Zamba's 12-token KV ring
    ends a reply with finish_reason length."""
    model, ids, _ = fresh(name[:-6], tmp_path_factory) if name.endswith("-fresh") else golden(name)
    name = name.removesuffix("-fresh")
    reqs = [dict(ids=ids[:3], max_tokens=6), dict(ids=ids[:6], max_tokens=4, n=2),
            dict(ids=ids[:3] + [9], max_tokens=5)]
    events, sched = run_requests(model, reqs)
    for kw, ev in zip(reqs, events):
        s = model.session()
        want = "".join(s.generate(list(kw["ids"]), max_tokens=kw["max_tokens"], temperature=0))
        assert texts(ev, kw.get("n", 1)) == [want] * kw.get("n", 1), (name, kw)
        end = ev[-1]
        assert end[0] == "end" and end[1]["prompt_tokens"] == len(kw["ids"])
    assert max(ev[-1][1]["cached_tokens"] for ev in events) >= 3  # ids[:3] resumed by the later request
    if name == "zamba":  # max_context 12: a 6-token prompt has room for 6 more
        (ev,), _ = run_requests(model, [dict(ids=ids[:6], max_tokens=50)])
        assert ("done", 0, "length") in ev and ev[-1][1]["completion_tokens"] == 6


def test_timeout():
    """--timeout: a reply still going ends with finish_reason length; a request still queued gets a 503."""
    model, ids, _ = golden("mamba")
    (running, queued), _ = run_requests(model, [dict(ids=ids[:3], max_tokens=10 ** 9), dict(ids=ids[:4])],
                                        parallel=1, timeout=0.5)
    assert ("done", 0, "length") in running and 0 < running[-1][1]["completion_tokens"] < 10 ** 9
    assert queued == [("error", 503, "timed out after 0.5 s waiting for a free row (--timeout)")]


def test_chat_template_boundaries():
    """With a Jinja template (ChatML here), the prompt is the template's rendering; the ends of earlier
    messages are boundaries where the prefill caches a state, and the end markers stop a reply."""
    from edgeseq.chat_template import NAMES, from_spec
    from edgeseq.serve.app import Server

    model, _, _ = golden("mamba")
    srv = Server(model, "m")
    srv.template = from_spec(NAMES["chatml"], model.tokenizer)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    ids, bounds, stops, _, _ = srv._chat_prompt(msgs)
    text = "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n" \
           "<|im_start|>user\nv<|im_end|>\n<|im_start|>assistant\n"
    assert ids == list(text.encode())
    assert [text.encode()[:b].decode().rsplit("\n", 2)[-2] for b in bounds] == ["s<|im_end|>", "u<|im_end|>",
                                                                               "a<|im_end|>"]
    assert "<|im_end|>" in stops


_MALLINFO = r"""
import ctypes, sys
import numpy as np
from edgeseq.serve.malloc import pin_mmap_threshold
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
pinned = pin_mmap_threshold() if sys.argv[1] == "pin" else False
a = np.ones(300_000, np.uint8)  # over 128 KiB: mapped
live = libc.mallinfo2().hblks
del a  # glibc, unpinned, now raises its threshold past 300 KB
b = np.ones(300_000, np.uint8)
print(pinned, libc.mallinfo2().hblks - live)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("mode", ["pin", "none"])
def test_a_freed_state_sized_block_stays_out_of_the_heap(mode):
    """serve/malloc.py: with the threshold pinned, a block of a cached state's size freed and made again is
    mapped again (mallinfo2's count of mapped blocks); unpinned, glibc's moving threshold puts it in the heap,
    where a server's churn of states leaves holes RSS keeps."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc >= 2.33")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-P", "-c", _MALLINFO, mode], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    assert out == (["True", "0"] if mode == "pin" else ["False", "-1"])
