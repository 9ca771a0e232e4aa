"""`edgeseq serve` as a real process on a free loopback port, driven by the official `openai` client and by
raw HTTP (http.client) for the requests a client library would never send.

References: greedy text equals the in-process session's (runtime/session.py, proven against each family's
reference) and, for a tiny Mamba, the tokens equal transformers' greedy choice; a resumed conversation
equals a cold prefill of the whole of it.
"""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")  # the serve extra and openai: make test installs both

import edgeseq  # noqa: E402
from conftest import hf_logits64  # noqa: E402

KEY = "test-key-1"


class Server:
    """`python -m edgeseq.cli_serve serve ARGS --port 0`, its stderr drained by a thread."""

    def __init__(self, *args):
        cmd = [sys.executable, "-P", "-m", "edgeseq", "serve", *map(str, args), "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self.ready.wait(90):
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        m = re.search(r"http://127\.0\.0\.1:(\d+)", "".join(self.lines))
        assert m, self.lines
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise AssertionError("no /health:\n" + "".join(self.lines))

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            if "edgeseq serve:" in line or "error" in line:
                self.ready.set()
        self.ready.set()

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def request(self, method, path, body=None, headers=None, timeout=60):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        c.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = c.getresponse()
        data = r.read()
        c.close()
        return r.status, data

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def metrics(self, headers=None) -> dict:
        _, text = self.get("/metrics", headers=headers)
        out = {}
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def demo():
    """The shipped demo (no MODEL given), 16 rows."""
    s = Server("--parallel", 16, "--cache-ram", 64, "--cors", "http://app.example")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def demo_model():
    from edgeseq.exporters.demo import demo_bundle

    return edgeseq.load(demo_bundle())


def cold(model, prompt, max_tokens, **kw) -> str:
    """The in-process reference: a fresh session's generate()."""
    return "".join(model.session().generate(prompt, max_tokens=max_tokens, temperature=0, **kw))


# -- the openai client on every endpoint --------------------------------------------------------------

def test_models_and_health(demo):
    c = demo.client()
    models = c.models.list()
    assert [m.id for m in models.data] == ["edgeseq-demo"]
    assert c.models.retrieve("edgeseq-demo").id == "edgeseq-demo"
    status, body = demo.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_completions_stream_and_not(demo, demo_model):
    c = demo.client()
    want = cold(demo_model, "And God said", 40)
    r = c.completions.create(model="edgeseq-demo", prompt="And God said", max_tokens=40, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 12 and r.usage.completion_tokens == 40
    pieces, finish, usage = [], None, None
    for ch in c.completions.create(model="edgeseq-demo", prompt="And God said", max_tokens=40, temperature=0,
                                   stream=True, stream_options={"include_usage": True}):
        if ch.choices:
            pieces.append(ch.choices[0].text)
            finish = ch.choices[0].finish_reason or finish
        else:
            usage = ch.usage
    assert "".join(pieces) == want and finish == "length"
    assert usage.completion_tokens == 40 and usage.prompt_tokens_details.cached_tokens == 12  # the whole prompt
    cut = want.find(want[8:12])
    stop = c.completions.create(model="edgeseq-demo", prompt="And God said", max_tokens=40, temperature=0,
                                stop=[want[8:12]])
    assert stop.choices[0].text == want[:cut] and stop.choices[0].finish_reason == "stop"


def test_chat_multi_turn_cache_and_exactness(demo, demo_model):
    """Without a chat template (the demo), chat is the chat command's plain continuation. Each turn resumes
    the state after the previous reply (cached_tokens = everything before the new message) and its reply
    equals a cold prefill of the whole conversation."""
    c = demo.client()
    msgs = [{"role": "system", "content": "The book of Genesis."}, {"role": "user", "content": "In the beginning"}]
    seen = 0
    for turn, nxt in enumerate(["And the earth", "And God saw the light"]):
        r = c.chat.completions.create(model="edgeseq-demo", messages=msgs, max_tokens=24, temperature=0)
        text = "The book of Genesis.\n" + "".join(
            ("\n" if i else "") + m["content"] if m["role"] == "user" else m["content"]
            for i, m in enumerate(msgs[1:]))
        reply = r.choices[0].message.content
        assert reply == cold(demo_model, text, 24), turn
        assert r.usage.prompt_tokens == len(text.encode())
        assert r.usage.prompt_tokens_details.cached_tokens == seen, turn
        seen = len((text + reply).encode())  # the next turn resumes after this reply
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": nxt}]
    # streamed: the same reply, role first, [DONE] handled by the client
    deltas = list(c.chat.completions.create(model="edgeseq-demo", messages=msgs[:2], max_tokens=24, temperature=0,
                                            stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    streamed = "".join(d.choices[0].delta.content or "" for d in deltas)
    assert streamed == cold(demo_model, "The book of Genesis.\nIn the beginning", 24)
    assert deltas[-1].choices[0].finish_reason == "length"


def test_chat_template_equals_the_chat_command(tmp_path):
    """A model with a Jinja chat template (the demo exported with ChatML): each turn's reply equals the chat
    command's (runtime/chat.py: one session fed only each turn's new text), and turn 2 resumes the state
    after turn 1's reply."""
    from edgeseq.chat_template import NAMES
    from edgeseq.exporters.export import export
    from edgeseq.runtime.chat import Chat

    bundle = export(str(Path(edgeseq.__file__).parent / "demo" / "rwkv7"), str(tmp_path / "chatml"),
                    chat_template=NAMES["chatml"])
    chat = Chat(edgeseq.load(bundle), system="Be brief.", max_tokens=12, temperature=0)
    s = Server(bundle, "--parallel", 2)
    try:
        msgs = [{"role": "system", "content": "Be brief."}]
        for turn, user in enumerate(["Who made the light?", "And the waters?"]):
            msgs.append({"role": "user", "content": user})
            r = s.client().chat.completions.create(model="chatml", messages=msgs, max_tokens=12, temperature=0)
            reply = r.choices[0].message.content
            assert reply == "".join(chat.handle(user)), turn
            if turn:
                assert r.usage.prompt_tokens_details.cached_tokens == len(chat.consumed.encode()) - len(
                    "<|im_end|>\n<|im_start|>user\nAnd the waters?<|im_end|>\n<|im_start|>assistant\n"
                    + reply)
            msgs.append({"role": "assistant", "content": reply})
    finally:
        assert s.stop() == 0


def _greedy(model, prompt, max_tokens):
    """(text, the token ids fed after the prompt) of a fresh session's greedy generate()."""
    s, fed = model.session(), []
    step = s.step
    s.step = lambda t: fed.append(int(t)) or step(t)
    return "".join(s.generate(prompt, max_tokens=max_tokens, temperature=0)), fed


def test_a_reply_sent_back_keeps_its_token_ids(bpe_mamba):
    """A BPE model's random reply does not re-tokenize to the ids it was generated as. Sent back as text
    (completions and chat), the prompt takes the ids the model saw for prompt + reply, so the reply's cached
    state is resumed (cached_tokens), and tokenizes the rest as the whole text's tokenization has it; the
    answer equals a cold run on those ids. --retokenize tokenizes afresh and resumes only the prompt."""
    model = bpe_mamba.model()
    tok = model.tokenizer
    p1, more = "Friends, Romans", "\nlend me your ears"
    reply, gen = _greedy(model, p1, 12)
    ids1 = tok.encode(p1)
    assert tok.encode(p1 + reply)[len(ids1):] != gen  # the premise: re-tokenized, the reply is other ids
    full, k = tok.encode_split(p1 + reply + more, len(p1 + reply))
    want_ids = ids1 + gen + full[k:]
    want, _ = _greedy(model, want_ids, 8)
    s = Server(bpe_mamba.bundle(), "--parallel", 2, "--alias", "bpe")
    try:
        c = s.client()
        r1 = c.completions.create(model="bpe", prompt=p1, max_tokens=12, temperature=0)
        assert r1.choices[0].text == reply
        r2 = c.completions.create(model="bpe", prompt=p1 + reply + more, max_tokens=8, temperature=0)
        assert r2.usage.prompt_tokens == len(want_ids)
        assert r2.usage.prompt_tokens_details.cached_tokens == len(ids1) + len(gen)
        assert r2.choices[0].text == want
        # chat without a template: the plain continuation renders the same text
        msgs = [{"role": "user", "content": p1}]
        r3 = c.chat.completions.create(model="bpe", messages=msgs, max_tokens=12, temperature=0)
        assert r3.choices[0].message.content == reply
        more = "\nI come to bury Caesar"
        msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": more[1:]}]
        full, k = tok.encode_split(p1 + reply + more, len(p1 + reply))
        r4 = c.chat.completions.create(model="bpe", messages=msgs, max_tokens=8, temperature=0)
        assert r4.choices[0].message.content == _greedy(model, ids1 + gen + full[k:], 8)[0]
        assert r4.usage.prompt_tokens_details.cached_tokens == len(ids1) + len(gen)
        assert s.metrics()["edgeseq_reply_ids_reused_total"] == 2
    finally:
        assert s.stop() == 0
    s = Server(bpe_mamba.bundle(), "--parallel", 2, "--alias", "bpe", "--retokenize")
    try:
        c = s.client()
        c.completions.create(model="bpe", prompt=p1, max_tokens=12, temperature=0)
        more = "\nlend me your ears"
        r2 = c.completions.create(model="bpe", prompt=p1 + reply + more, max_tokens=8, temperature=0)
        assert r2.usage.prompt_tokens == len(tok.encode(p1 + reply + more))
        assert r2.usage.prompt_tokens_details.cached_tokens == len(ids1)
        assert r2.choices[0].text == _greedy(model, p1 + reply + more, 8)[0]
    finally:
        assert s.stop() == 0


def test_rewritten_history_reuses_the_common_prefix(demo):
    """A conversation whose earlier reply was edited no longer extends the cached one: the server resumes
    the longest common prefix (the end of the first user message) and says so in cached_tokens."""
    c = demo.client()
    base = [{"role": "user", "content": "Thou shalt"}]
    c.chat.completions.create(messages=base, max_tokens=8, temperature=0, model="edgeseq-demo")
    edited = base + [{"role": "assistant", "content": " EDITED"}, {"role": "user", "content": "And"}]
    r = c.chat.completions.create(messages=edited, max_tokens=4, temperature=0, model="edgeseq-demo")
    assert r.usage.prompt_tokens_details.cached_tokens == len("Thou shalt")


def test_n_choices(demo, demo_model):
    c = demo.client()
    r = c.completions.create(model="edgeseq-demo", prompt="And Moses", max_tokens=16, temperature=0, n=3)
    want = cold(demo_model, "And Moses", 16)
    assert [ch.text for ch in r.choices] == [want] * 3 and [ch.index for ch in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == 48 and r.usage.prompt_tokens == 9
    r = c.completions.create(model="edgeseq-demo", prompt="And Moses", max_tokens=24, temperature=1.0, seed=5, n=4)
    texts = [ch.text for ch in r.choices]
    assert len(set(texts)) > 1  # forks of one state, each with its own sampler
    again = c.completions.create(model="edgeseq-demo", prompt="And Moses", max_tokens=24, temperature=1.0, seed=5, n=4)
    assert [ch.text for ch in again.choices] == texts  # seeded: reproducible
    chat = list(c.chat.completions.create(model="edgeseq-demo", messages=[{"role": "user", "content": "And"}],
                                          max_tokens=5, n=2,
                                          temperature=0, stream=True))
    per = {0: "", 1: ""}
    for ch in chat:
        for x in ch.choices:
            per[x.index] += x.delta.content or ""
    assert per[0] == per[1] == cold(demo_model, "And", 5)


def test_concurrent_equals_sequential(demo):
    """16 greedy streaming clients at once get the tokens 16 sequential ones get, and they were decoded
    together (fewer batched steps than tokens)."""
    prompts = [f"And the LORD spake unto {name}" for name in
               ("Moses", "Aaron", "Noah", "Abram", "Joshua", "Samuel", "David", "Jacob", "Isaac", "Gideon",
                "Elijah", "Jonah", "Saul", "Job", "Cain", "Lot")]
    c = demo.client()

    def run(p):
        chunks = c.completions.create(model="edgeseq-demo", prompt=p, max_tokens=48, temperature=0, stream=True)
        return "".join(ch.choices[0].text for ch in chunks if ch.choices)

    before = demo.metrics()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts))
    after = demo.metrics()
    steps = after["edgeseq_decode_step_seconds_count"] - before["edgeseq_decode_step_seconds_count"]
    tokens = after["edgeseq_generated_tokens_total"] - before["edgeseq_generated_tokens_total"]
    assert tokens == 16 * 48 and steps < tokens / 2, (steps, tokens)
    alone = [run(p) for p in prompts]
    assert together == alone


def test_cors(demo):
    """--cors ORIGIN: that origin's browser requests are allowed (preflight included), no other's."""
    c = http.client.HTTPConnection("127.0.0.1", demo.port, timeout=10)
    c.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://app.example",
                                                          "Access-Control-Request-Method": "POST"})
    r = c.getresponse()
    r.read()
    assert r.status == 200 and r.getheader("access-control-allow-origin") == "http://app.example"
    c.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    r = c.getresponse()
    r.read()
    assert r.getheader("access-control-allow-origin") is None
    c.close()


def test_disconnect_while_waiting_for_a_whole_answer(demo):
    """A non-streamed request whose client goes away: its row is freed within about a second."""
    import socket

    body = json.dumps({"model": "edgeseq-demo", "prompt": "And", "max_tokens": 1 << 20}).encode()
    sock = socket.create_connection(("127.0.0.1", demo.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert _wait(lambda: demo.metrics()["edgeseq_rows_busy"] == 1)
    sock.close()
    assert _wait(lambda: demo.metrics()["edgeseq_rows_busy"] == 0)


def test_metrics_text(demo):
    for _ in range(2):  # the second resumes the first's prompt
        demo.client().chat.completions.create(model="edgeseq-demo", messages=[{"role": "user", "content": "Amen"}],
                                              max_tokens=2)
    m = demo.metrics()
    for k in ("edgeseq_prompt_tokens_total", "edgeseq_cached_tokens_total", "edgeseq_cache_hits_total",
              "edgeseq_queue_depth", "edgeseq_ttft_seconds_count",
              'edgeseq_requests_total{endpoint="chat",status="200"}'):
        assert k in m, k
    assert m["edgeseq_cache_hits_total"] >= 1 and m["edgeseq_rows_busy"] == 0


# -- a tiny Mamba: tokens against transformers ---------------------------------------------------------

def test_token_prompt_matches_transformers(byte_mamba):
    """A prompt of token ids, greedy: the tokens the server sends are transformers' argmax at each step."""
    s = Server(byte_mamba.bundle(), "--parallel", 2, "--alias", "tiny")
    try:
        ids = byte_mamba.ids[:16]
        r = s.client().completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
        seq = list(ids)
        for _ in range(10):
            seq.append(int(np.argmax(hf_logits64(byte_mamba.hf64, seq)[-1])))
        session = byte_mamba.model().session()
        fed, step = [], session.step
        session.step = lambda t: fed.append(int(t)) or step(t)
        want = "".join(session.generate(ids, max_tokens=10, temperature=0))
        assert fed == seq[16:]  # the session's greedy tokens are transformers'
        assert r.choices[0].text == want and r.usage.completion_tokens == 10
    finally:
        assert s.stop() == 0


def test_attention_family_one_row_per_step():
    """Zamba (the golden tiny bundle, a 12-token KV ring): its rows are sessions stepped one after another;
    two concurrent requests give each session's own greedy tokens, a reply that fills the ring ends with
    length, and a prompt that fills it is a 400."""
    bundle = Path(__file__).resolve().parent / "data" / "golden" / "zamba" / "bundle"
    model = edgeseq.load(str(bundle), max_context=12)
    s = Server(bundle, "--parallel", 2, "--max-context", 12, "--alias", "z")
    try:
        c = s.client()
        prompts = [[5, 42, 0], [63, 17, 31, 8]]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: c.completions.create(model="z", prompt=p, max_tokens=4, temperature=0),
                                prompts))
        for p, r in zip(prompts, got):
            assert r.choices[0].text == "".join(model.session().generate(p, max_tokens=4, temperature=0))
        full = c.completions.create(model="z", prompt=prompts[1], max_tokens=100, temperature=0)
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens <= 12 - 4
        with pytest.raises(openai.BadRequestError, match="KV ring"):
            c.completions.create(model="z", prompt=[1] * 12, max_tokens=1)
    finally:
        assert s.stop() == 0


# -- limits, bad requests, disconnects, shutdown -------------------------------------------------------

@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-cache")
    s = Server("--parallel", 1, "--queue", 1, "--api-key", KEY, "--max-prompt-tokens", 300, "--max-body", 0.01,
               "--cache-dir", d)
    s.cache_dir = d
    yield s
    s.stop()


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [  # (path, body, status, words the message must hold, param)
    (COMP, b"{not json", 400, "not valid JSON", None),
    (COMP, b'{"prompt": "\xff\xfe"}', 400, "UTF-8", None),
    (COMP, b"[1, 2]", 400, "JSON object", None),
    (COMP, b"[" * 5000 + b"]" * 5000, 400, "nested too deeply", None),
    (COMP, {"prompt": "a", "max_tokens": 1e400}, 400, "JSON", None),
    (COMP, b'{"prompt": "a", "temperature": NaN}', 400, "NaN", None),
    (COMP, {}, 400, "required", "prompt"),
    (COMP, {"prompt": 5}, 400, "string or a list", "prompt"),
    (COMP, {"prompt": ["a", "b"]}, 400, "several prompts", "prompt"),
    (COMP, {"prompt": [1, 999999]}, 400, "outside the vocabulary", "prompt"),
    (COMP, {"prompt": "\ud800"}, 400, "Unicode", "prompt"),
    (COMP, {"prompt": "a", "max_tokens": -1}, 400, "from 0", "max_tokens"),
    (COMP, {"prompt": "a", "max_tokens": "9"}, 400, "integer", "max_tokens"),
    (COMP, {"prompt": "a", "max_tokens": 10 ** 12}, 400, "from 0", "max_tokens"),
    (COMP, {"prompt": "a", "temperature": 7}, 400, "[0, 2]", "temperature"),
    (COMP, {"prompt": "a", "temperature": True}, 400, "number", "temperature"),
    (COMP, {"prompt": "a", "top_p": 0}, 400, "(0, 1]", "top_p"),
    (COMP, {"prompt": "a", "seed": -3}, 400, "from 0", "seed"),
    (COMP, {"prompt": "a", "n": 2}, 400, "--parallel", "n"),
    (COMP, {"prompt": "a", "n": 0}, 400, "from 1", "n"),
    (COMP, {"prompt": "a", "stop": [1]}, 400, "strings", "stop"),
    (COMP, {"prompt": "a", "logprobs": 2}, 400, "not supported", "logprobs"),
    (COMP, {"prompt": "a", "echo": True}, 400, "not supported", "echo"),
    (COMP, {"prompt": "a", "best_of": 3}, 400, "not supported", "best_of"),
    (COMP, {"prompt": "a", "frobnicate": 1}, 400, "unknown field", "frobnicate"),
    (COMP, {"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream: true", "stream_options"),
    (COMP, {"prompt": "a", "model": "gpt-4"}, 404, "not served", "model"),
    (COMP, {"prompt": "x" * 400}, 400, "at most 300", "prompt"),
    (COMP, {"prompt": "x" * 20000}, 413, "limit", None),
    (CHAT, {}, 400, "required", "messages"),
    (CHAT, {"messages": []}, 400, "required", "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "one of", "messages[0].role"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "tool", "messages[0].role"),
    (CHAT, {"messages": [{"role": "user", "content": 3}]}, 400, "string", "messages[0].content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "text parts",
     "messages[0].content[0]"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, 400, "not supported", "messages[0].name"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "not supported",
     "tools"),
    (CHAT, {"messages": MSG, "logprobs": True}, 400, "not supported", "logprobs"),
    (CHAT, {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "not supported", "response_format"),
    (CHAT, {"messages": MSG, "stream": "yes"}, 400, "true or false", "stream"),
    (CHAT, {"messages": MSG, "stream": True, "stream_options": {"x": 1}}, 400, "unknown", "stream_options.x"),
    (CHAT, {"messages": MSG, "max_completion_tokens": -5}, 400, "from 0", "max_completion_tokens"),
]


@pytest.mark.parametrize("path,body,status,words,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests(small, path, body, status, words, param):
    got, data = small.request("POST", path, body, AUTH)
    err = json.loads(data)["error"]
    assert got == status and words in err["message"] and err["param"] == param, (got, err)
    assert set(err) == {"message", "type", "param", "code"}


def test_off_values_and_routes(small):
    ok, data = small.request("POST", COMP, {"prompt": "a", "max_tokens": 2, "logprobs": None, "presence_penalty": 0,
                                            "echo": False, "user": "u"}, AUTH)
    assert ok == 200, data
    assert small.request("GET", "/v1/nothing", headers=AUTH)[0] == 404
    status, data = small.request("GET", COMP, headers=AUTH)
    assert status == 405 and "error" in json.loads(data)
    assert small.get("/health")[0] == 200  # no key needed


def test_api_key(small):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, data = small.request("POST", COMP, {"prompt": "a"}, headers)
        assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    assert small.get("/metrics")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        small.client("wrong").models.list()
    assert small.client(KEY).models.list().data[0].id == "edgeseq-demo"


def _open_stream(server, body):
    """A streaming request on its own connection, read up to its first event; returns the connection."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    c.request("POST", COMP, json.dumps({**body, "stream": True}), {"Content-Type": "application/json", **AUTH})
    r = c.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")
    return c, r


def _wait(pred, seconds=20):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return False


def test_queue_full_and_disconnects(small):
    """--parallel 1 --queue 1: one request decodes, one waits, the third gets 429. A client that goes away
    mid-stream frees its row at once: the waiting one starts; when it goes away too, nothing is left busy."""
    endless = {"prompt": "And", "max_tokens": 1 << 20, "temperature": 0}
    a, ra = _open_stream(small, endless)
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(zip(("c", "r"), _open_stream(small, endless))))
    t.start()
    assert _wait(lambda: small.metrics(AUTH)["edgeseq_queue_depth"] == 1)
    status, data = small.request("POST", COMP, {"prompt": "a"}, AUTH)
    err = json.loads(data)["error"]
    assert status == 429 and err["type"] == "rate_limit_error"
    ra.close()
    a.close()  # the first client disconnects mid-stream
    t.join(30)
    assert "r" in waiting  # the waiting request got the row
    waiting["r"].close()
    waiting["c"].close()
    assert _wait(lambda: small.metrics(AUTH)["edgeseq_rows_busy"] == 0)
    m = small.metrics(AUTH)
    assert m["edgeseq_cancelled_total"] >= 2 and m["edgeseq_rejected_queue_full_total"] >= 1
    ok, _ = small.request("POST", COMP, {"prompt": "a", "max_tokens": 3}, AUTH)
    assert ok == 200


def test_sigterm_drains_and_the_cache_dir_survives(small):
    """SIGTERM while a request runs: it completes, the process exits 0, its states are in --cache-dir;
    a new server on that folder resumes the conversation from disk."""
    prompt = "And Noah builded an altar unto the LORD"
    result = {}

    def go():
        result["r"] = small.request("POST", COMP, {"prompt": prompt, "max_tokens": 500, "temperature": 0}, AUTH)

    t = threading.Thread(target=go)
    t.start()
    assert _wait(lambda: small.metrics(AUTH)["edgeseq_rows_busy"] == 1, 10)
    assert small.stop() == 0
    t.join(30)
    status, data = result["r"]
    body = json.loads(data)
    assert status == 200 and body["usage"]["completion_tokens"] == 500, body
    reply = body["choices"][0]["text"]
    assert any(small.cache_dir.rglob("*.state"))
    again = Server("--parallel", 1, "--cache-dir", small.cache_dir)
    try:
        r = again.client().completions.create(model="edgeseq-demo", prompt=prompt + reply + " and", max_tokens=2,
                                              temperature=0)
        assert r.usage.prompt_tokens_details.cached_tokens == len((prompt + reply).encode())
    finally:
        assert again.stop() == 0


def test_cli_errors(tmp_path):
    def run(*args):
        p = subprocess.run([sys.executable, "-P", "-m", "edgeseq", "serve", *map(str, args)],
                           capture_output=True, text=True, timeout=60)
        return p.returncode, p.stderr

    for args, words in ((["--port", "70000"], "--port 70000"), (["--parallel", "0"], "--parallel 0"),
                        (["--cache-ram", "-1"], "--cache-ram"), ([tmp_path / "nope"], "no such file"),
                        (["--api-key", ""], "--api-key")):
        code, err = run(*args)
        assert code == 1 and err.startswith("error:") and words in err and "Traceback" not in err, (args, err)
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code, err = run("--port", taken.getsockname()[1])
        assert code == 1 and "cannot listen" in err and "Traceback" not in err, err
