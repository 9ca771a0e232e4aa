"""edgeseq's reader fuzzer: structure-aware mutations of tiny valid files, each run under a time and memory
limit in a worker process, each outcome classified (docs/reliability.md).

    seeds.py      tiny valid inputs for every reader, built deterministically (numpy; torch for .pth)
    mutations.py  per-format mutators: truncation at every boundary, huge counts and lengths, negative
                  or overflowing dims, offsets past the end or overlapping, wrong types and dtypes,
                  duplicate and unicode names, bit flips; each mutation says whether it must be refused
    targets.py    the registry of readers: seed, mutations, and what reading means (an export, a load and
                  two tokens, ...), each defined by format in checkpoints.py, gguf_files.py, bundles.py,
                  texts.py and chat.py
    harness.py    the worker pool (RLIMIT_AS, a timeout per input) and the classification
    run.py        the command line: short seeded runs (the test suite) and long ones
"""
