"""The HTTP face: Starlette routes speaking OpenAI's API, served by uvicorn (docs/serve.md).

    GET  /health               {"status": "ok"} (no key needed)
    GET  /metrics              Prometheus text
    GET  /v1/models[/{id}]     the one model served
    POST /v1/completions       text completion, streamed (server-sent events, [DONE]) or not
    POST /v1/chat/completions  chat: the model's own template, else the chat command's plain continuation

Every error is an OpenAI error object ({"error": {message, type, param, code}}) with a 4xx status: bad
JSON or UTF-8, a wrong type, an unknown or unsupported field, an unknown model (404), a body over the limit
(413), a prompt over --max-prompt-tokens (400, context_length_exceeded), a full queue (429), a wrong or
missing key (401). Tokenizing and template rendering run in a thread, the model in the scheduler's.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import traceback
import uuid
from collections import deque
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeseq.chat_template import for_model
from edgeseq.errors import EdgeseqError
from edgeseq.serve import protocol as P
from edgeseq.serve.cache import ReplyTexts, StateCache
from edgeseq.serve.metrics import Metrics
from edgeseq.serve.scheduler import Draining, QueueFull, Request, Scheduler

MAX_BOUNDARIES = 8  # earlier messages whose end is cached (the last ones)


class Server:
    def __init__(self, model, name: str, parallel: int = 4, cache_ram_mb: float = 256, cache_dir: str | None = None,
                 api_key: str | None = None, max_prompt_tokens: int = 32768, queue: int = 64,
                 max_body_mb: float = 8, cors: list[str] | None = None, chat_max_tokens: int = 2048,
                 timeout: float = 600.0, reuse_replies: bool = True):
        self.model = model
        self.name = name
        self.parallel = parallel
        self.api_key = api_key
        self.max_prompt_tokens = max_prompt_tokens
        self.max_body = int(max_body_mb * (1 << 20))
        self.cors = cors or []
        self.chat_max_tokens = chat_max_tokens
        self.created = int(time.time())
        self.template = for_model(model.manifest, model.tokenizer)
        self.metrics = Metrics()
        self.cache = StateCache(model, int(cache_ram_mb * (1 << 20)), cache_dir)
        # a reply's own token ids stand for its text when the client sends it back (cache.py); only worth
        # keeping where its state can be cached
        self.replies = ReplyTexts() if reuse_replies and (cache_ram_mb > 0 or cache_dir) else None
        self.scheduler = Scheduler(model, self.cache, parallel, queue, self.metrics, timeout, self.replies)
        bos = model.manifest.get("bos_token_id")
        self.bos = int(bos) if bos is not None else None
        self.add_bos = bool(model.manifest.get("add_bos")) and self.bos is not None

    # -- the app ------------------------------------------------------------------------------------------
    def app(self) -> Starlette:
        @asynccontextmanager
        async def lifespan(app):
            self.scheduler.start()
            try:
                yield
            finally:  # SIGTERM: uvicorn has drained the requests in flight; then the worker, then the cache
                await run_in_threadpool(self.scheduler.stop)
                await run_in_threadpool(self.cache.flush)

        routes = [Route("/health", self.health), Route("/metrics", self._guard("metrics", self.metrics_text)),
                  Route("/v1/models", self._guard("models", self.models)),
                  Route("/v1/models/{model:path}", self._guard("models", self.one_model)),
                  Route("/v1/completions", self._guard("completions", self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", self._guard("chat", self.chat), methods=["POST"])]
        middleware = [Middleware(CORSMiddleware, allow_origins=self.cors, allow_methods=["GET", "POST"],
                                 allow_headers=["Authorization", "Content-Type"])] if self.cors else []

        async def http_error(request, exc: HTTPException):
            e = P.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                           code="not_found" if exc.status_code == 404 else None)
            return JSONResponse(e.body(), exc.status_code)

        return Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                         exception_handlers={HTTPException: http_error})

    def _guard(self, endpoint: str, handler):
        async def wrapped(request: HttpRequest):
            try:
                if self.api_key is not None:
                    auth = request.headers.get("authorization", "")
                    if not hmac.compare_digest(auth.encode(), f"Bearer {self.api_key}".encode()):
                        raise P.ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                         code="invalid_api_key")
                resp = await handler(request)
            except P.ApiError as e:
                resp = JSONResponse(e.body(), e.status)
            except EdgeseqError as e:  # the model refused the input (a template's raise_exception, ...)
                resp = JSONResponse(P.ApiError(400, str(e)).body(), 400)
            except ClientDisconnect:
                resp = Response(status_code=499)
            except Exception:  # a bug: the server keeps going, the client gets a 500 with no details
                traceback.print_exc()
                resp = JSONResponse(P.ApiError(500, "internal server error", type="server_error").body(), 500)
            self.metrics.request(endpoint, resp.status_code)
            return resp
        return wrapped

    async def _body(self, request: HttpRequest) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise P.ApiError(413, f"the body is {declared} bytes; the limit is {self.max_body}",
                             code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise P.ApiError(413, f"the body is over the limit of {self.max_body} bytes", code="request_too_large")
        return P.parse_json(bytes(raw))

    # -- simple routes ------------------------------------------------------------------------------------
    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.name})

    async def metrics_text(self, request):
        c, s = self.cache, self.scheduler
        gauges = {"queue_depth": (s.queued, "requests waiting for a row"),
                  "rows_busy": (s.busy_rows, "rows prefilling or decoding"),
                  "rows_max": (self.parallel, "--parallel"),
                  "cache_bytes": (c.used, "bytes of states held in RAM"),
                  "cache_entries": (c.entries, "states held in RAM"),
                  "cache_disk_entries": (len(c.disk), "states held in the cache folder"),
                  "cache_evictions": (c.evictions, "states pushed out of RAM")}
        return PlainTextResponse(self.metrics.render(gauges), media_type="text/plain; version=0.0.4")

    def _model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "edgeseq"}

    async def models(self, request):
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request):
        P.check_model({"model": request.path_params["model"]}, self.name)
        return JSONResponse(self._model_card())

    # -- completions --------------------------------------------------------------------------------------
    async def completions(self, request):
        body = await self._body(request)
        opts = P.check_common(body, P.COMPLETIONS, self.parallel, 16)  # 16: OpenAI's default max_tokens
        P.check_model(body, self.name)
        prompt = P.completion_prompt(body)
        ids = await run_in_threadpool(self._ids, prompt)
        text = prompt if isinstance(prompt, str) else None
        return await self._answer(request, ids, opts, opts["stops"], set(self.model.stop_token_ids), [], "text", text)

    async def chat(self, request):
        body = await self._body(request)
        opts = P.check_common(body, P.CHAT, self.parallel, self.chat_max_tokens)
        P.check_model(body, self.name)
        messages = P.chat_messages(body)
        ids, bounds, stops, ends, text = await run_in_threadpool(self._chat_prompt, messages)
        return await self._answer(request, ids, opts, stops + opts["stops"], ends, bounds, "chat", text)

    def _ids(self, prompt, where: str = "prompt", counted: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = self._reply_ids(prompt, counted)
            if ids is None:
                ids = self.model.tokenizer.encode(prompt)
                if self.add_bos and (not ids or ids[0] != self.bos):
                    ids = [self.bos] + ids  # a fresh sequence starts with BOS where the model's tokenizer adds one
        else:
            ids = prompt
            bad = next((t for t in ids if not 0 <= t < self.model.vocab_size), None)
            if bad is not None:
                raise P.bad(where, f"token id {bad} is outside the vocabulary (0..{self.model.vocab_size - 1})")
            if not ids and self.bos is not None:
                ids = [self.bos]
        if not ids:
            raise P.bad(where, "is empty and the model has no BOS token to start from")
        if len(ids) > self.max_prompt_tokens:
            raise P.ApiError(400, f"the prompt is {len(ids)} tokens; this server takes at most "
                                  f"{self.max_prompt_tokens} (--max-prompt-tokens)", where, "context_length_exceeded")
        mc = self.model.max_context
        if mc and len(ids) >= mc:
            raise P.ApiError(400, f"the prompt is {len(ids)} tokens; the model's KV ring holds {mc}", where,
                             "context_length_exceeded")
        return ids

    def _reply_ids(self, text: str, counted: bool) -> list[int] | None:
        """The ids of a prompt that starts with an earlier prompt + reply: the ids the model saw for that
        part, then the rest as the whole text's tokenization has it (None: no such prompt, or no token
        boundary where the reply ends)."""
        hit = self.replies.longest(text) if self.replies is not None else None
        if hit is None:
            return None
        cold, k = self.model.tokenizer.encode_split(text, hit[0])
        if k is None:
            return None
        if counted:
            self.metrics.add("reply_ids_reused", 1)
        return hit[1] + cold[k:]

    def _chat_prompt(self, messages: list[dict]):
        """(ids, token counts where earlier messages end, stop strings, end token ids, the prompt's text)."""
        ends = set(self.model.stop_token_ids)
        if self.template is None:
            text, cuts = P.plain_render(messages)
            prefixes = [text[:c] for c in cuts]
            stops = []
        else:
            text = self.template.render(messages, add_generation_prompt=True)
            prefixes = []
            for i in range(max(1, len(messages) - MAX_BOUNDARIES), len(messages)):
                try:  # a template may refuse a partial conversation (one that must end on a user turn)
                    prefixes.append(self.template.render(messages[:i], add_generation_prompt=False))
                except EdgeseqError:
                    continue
            stops = list(self.template.stop)
            ends |= set(self.template.stop_token_ids)
        ids = self._ids(text, "messages")
        bounds = []
        for p in prefixes[-MAX_BOUNDARIES:]:
            if not p or not text.startswith(p):
                continue
            pre = self._ids(p, "messages", counted=False)
            if len(pre) < len(ids) and ids[:len(pre)] == pre:  # only where the tokens part there too
                bounds.append(len(pre))
        return ids, bounds, stops, ends, text

    # -- running a request --------------------------------------------------------------------------------
    async def _answer(self, http: HttpRequest, ids, opts, stops, ends, bounds, kind: str, text: str | None = None):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        pending: deque = deque()
        scheduled = [False]

        def drain():  # on the loop: whatever the worker emitted since the last drain
            scheduled[0] = False
            while pending:
                events.put_nowait(pending.popleft())

        def emit(ev):  # in the worker: one wake-up of the loop per batch of events, not one per token
            pending.append(ev)
            if not scheduled[0]:
                scheduled[0] = True
                try:
                    loop.call_soon_threadsafe(drain)
                except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                    pass

        req = Request(ids=ids, emit=emit, n=opts["n"], max_tokens=opts["max_tokens"], temperature=opts["temperature"],
                      top_k=opts["top_k"], top_p=opts["top_p"], min_p=opts["min_p"],
                      repetition_penalty=opts["repetition_penalty"], seed=opts["seed"], stops=stops, ends=ends,
                      boundaries=bounds, text=text)
        req.checked = time.monotonic()  # when _next last asked whether the client is still there
        try:
            self.scheduler.submit(req)
        except QueueFull:
            self.metrics.add("rejected_queue_full", 1)
            raise P.ApiError(429, "the server is busy: its queue is full; retry later", code="rate_limit_exceeded",
                             type="rate_limit_error") from None
        except Draining:
            raise P.ApiError(503, "the server is shutting down", type="server_error") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            first = await self._next(http, events, req)
        except BaseException:
            self._cancel(req)
            raise
        if first[0] == "error":
            raise P.ApiError(first[1], first[2], type="invalid_request_error" if first[1] < 500 else "server_error",
                             code="timeout" if first[1] == 503 else None)
        if opts["stream"]:
            return StreamingResponse(self._stream(http, events, req, first, rid, kind, opts["include_usage"]),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, finish, usage, ev = [[] for _ in range(req.n)], [None] * req.n, None, first
        try:
            while True:
                if ev[0] == "text":
                    texts[ev[1]].append(ev[2])
                elif ev[0] == "done":
                    finish[ev[1]] = ev[2]
                elif ev[0] == "end":
                    usage = ev[1]
                    break
                elif ev[0] == "error":
                    raise P.ApiError(ev[1], ev[2], type="server_error")
                ev = await self._next(http, events, req)
        except BaseException:
            self._cancel(req)
            raise
        if kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": "".join(t)}, "finish_reason": f,
                        "logprobs": None} for i, (t, f) in enumerate(zip(texts, finish))]
            obj = "chat.completion"
        else:
            choices = [{"index": i, "text": "".join(t), "finish_reason": f, "logprobs": None}
                       for i, (t, f) in enumerate(zip(texts, finish))]
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": self.name,
                             "choices": choices, "usage": _usage(usage)})

    async def _next(self, http: HttpRequest, events: asyncio.Queue, req):
        """The next event; a client that went away cancels the request (checked about once a second, also
        while events keep coming)."""
        while True:
            now = time.monotonic()
            if now - req.checked >= 1.0:
                req.checked = now
                if await http.is_disconnected():
                    raise ClientDisconnect()
            try:
                return await asyncio.wait_for(events.get(), 1.0)
            except asyncio.TimeoutError:
                pass

    def _cancel(self, req) -> None:
        req.cancelled = True
        self.scheduler.wake()

    async def _stream(self, http, events, req, first, rid, kind, include_usage):
        created = int(time.time())
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices, usage=None):
            d = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": choices}
            if include_usage:
                d["usage"] = usage
            return f"data: {json.dumps(d, ensure_ascii=False)}\n\n"

        def choice(i, text=None, finish=None, role=False):
            if kind == "chat":
                delta = ({"role": "assistant", "content": ""} if role else
                         {"content": text} if text is not None else {})
                return {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
            return {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}

        ended = False
        try:
            if kind == "chat":
                yield chunk([choice(i, role=True) for i in range(req.n)])
            ev = first
            while True:
                if ev[0] == "text":
                    text = ev[2]
                    while not events.empty():  # the pieces already here go out as one chunk
                        nxt = events.get_nowait()
                        if nxt[0] != "text" or nxt[1] != ev[1]:
                            yield chunk([choice(ev[1], text)])
                            ev, text = nxt, None
                            break
                        text += nxt[2]
                    if text is None:
                        continue
                    yield chunk([choice(ev[1], text)])
                elif ev[0] == "done":
                    yield chunk([choice(ev[1], finish=ev[2])])
                elif ev[0] == "end":
                    if include_usage:
                        yield chunk([], _usage(ev[1]))
                    break
                elif ev[0] == "error":
                    yield f"data: {json.dumps(P.ApiError(ev[1], ev[2], type='server_error').body())}\n\n"
                    break
                ev = await events.get()
            ended = True
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream (the task is cancelled): free its rows now
            if not ended:
                self._cancel(req)


def _usage(u: dict | None) -> dict | None:
    if u is None:
        return None
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}
