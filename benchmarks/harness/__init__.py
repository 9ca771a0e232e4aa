"""edgeseq's benchmark harness (see benchmarks/README.md; run it with `python benchmarks/bench.py`).

    cli.py       the command line: run, compare, report, agree, profile, list
    driver.py    the interleaved round-robin driver (rounds × cells × systems, the order rotating)
    protocol.py  the one child-process protocol (parent side); child.py its child side; tasks.py the tasks
    measure.py   one measurement: what every system is put through
    systems.py   systems as plugins: edgeseq (ONNX bundle, GGUF), llama.cpp, HF transformers, rwkv
    models.py    the registry of model shapes and the random-weight checkpoint builders
    canary.py    the CPU canary (contention beside every timed phase)
    proc.py      the one memory reader (VmRSS/VmHWM/RssAnon/RssFile/PSS), machine and git info, log
    report.py    medians and spread, the tables, compare
    tools.py     agree (logits of every system against one) and profile (ONNX Runtime's profiler)
"""
