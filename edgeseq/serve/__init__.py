"""`edgeseq serve`: an OpenAI-compatible HTTP server over one model (docs/serve.md).

app.py (Starlette routes, request checks, SSE), scheduler.py (one worker thread: admission, chunked
prefill, batched decode), rows.py (the batched state arena), cache.py (the state cache), protocol.py
(the OpenAI request fields and what each accepts), metrics.py (Prometheus text).
"""
