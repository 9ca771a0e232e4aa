"""Kept only for tests/pi/pi_host.py, which imports `checkpoint` from here; the memory table itself is
the harness's: `bench.py run --systems edgeseq edgeseq-lowmem --quant f32 f16 int8 int4 --models ...` then
`bench.py report --memory RESULTS.json` (see benchmarks/README.md)."""
from harness.models import build


def checkpoint(name: str, d: str) -> tuple[str, str | None]:
    """(checkpoint path, tokenizer.json or None) of a registered shape, built under d (harness.models)."""
    b = build(name, d)
    return b["checkpoint"], b["tokenizer"]
