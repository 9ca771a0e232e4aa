"""RWKV-6 from a BlinkDL .pth: what is special to it: the configuration read from the checkpoint and the
source it refuses. The common checks (small random v6.0 models of several shapes, head size 32 and 64,
1, 3 and 5 layers, different widths, ffn and LoRA sizes, against the `rwkv` package's reference forward
at every position of a 64-token sequence; both flavours; every graph kind; the state contract; plain
onnxruntime; save/load/fork; GGUF) run over the cases registered in tests/families.py (RWKV6_CONFIGS),
in tests/test_conformance.py; the WKV-6 kernel against its numpy reference is in tests/test_kernels.py."""
from __future__ import annotations

import pytest

from families import RWKV6_CONFIGS as CONFIGS
from rwkv_builders import FLAVOURS


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, family_case):
    return family_case(f"rwkv6/{request.param}")


@FLAVOURS
def test_config_read_from_checkpoint(case, portable):
    c = case.cfg
    m = case.model(portable)
    assert m.manifest["family"] == "rwkv6" and m.manifest["tokenizer"]["kind"] == "bytes"
    cfg = m.manifest["config"]
    assert cfg["ln_x_eps"] == 64e-5
    assert (cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["head_size"], cfg["dim_ffn"], cfg["mix_lora"],
            cfg["decay_lora"]) == (c["L"], c["C"], c["H"], c["C"] // c["H"], c["F"], c["D_MIX"], c["D_DECAY"])


def test_rwkv6_rejects_a_source_it_does_not_read():
    from edgeseq.errors import UnsupportedError
    from edgeseq.families.rwkv6 import Rwkv6

    class Src:
        path, stored_by, config = "x", "other", {}

        def has(self, name):
            return True

    with pytest.raises(UnsupportedError):
        Rwkv6.read_config(Src())
