"""llama.cpp's converter pads the vocabulary of granitehybrid and nemotron_h(_moe) files to a multiple of 8
(the token list and the embedding/head rows): edgeseq's GGUF does too, so a vocabulary of 250 still gets
llama.cpp's architecture, and llama.cpp and edgeseq's reader run the file to the same logits."""
import numpy as np
import pytest

import families  # noqa: F401  (the registry first: the family modules import it)
from conftest import random_ids
from family_granite_hybrid import make_granite
from family_nemotron_h import make_nemotron_h

lc = pytest.importorskip("llama_cpp")

MODELS = {"granitehybrid": lambda p: make_granite(p, kind="granite", vocab_size=250),
          "nemotron_h": lambda p: make_nemotron_h(p, vocab_size=250, hybrid_override_pattern="M*-M"),
          "nemotron_h_moe": lambda p: make_nemotron_h(p, vocab_size=250, hybrid_override_pattern="M*EM")}


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_padded_vocabulary_runs_in_llama_cpp(arch, tmp_path):
    import edgeseq
    from edgeseq.exporters.gguf_writer import export_gguf
    from edgeseq.gguf_file import GGUFFile

    ckpt = MODELS[arch](tmp_path / "hf")
    info = export_gguf(str(ckpt), str(tmp_path / "m.gguf"))
    assert info["architecture"] == arch, info.get("generic_because")
    g = GGUFFile(str(tmp_path / "m.gguf"))
    assert len(g.get("tokenizer.ggml.tokens")) == 256
    ids = random_ids(250, 12, seed=1)
    ours = edgeseq.load(str(tmp_path / "m.gguf"), max_context=64).session().prefill(ids).ravel()
    llm = lc.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                   type_k=0, type_v=0)
    llm.eval(ids)
    theirs = np.array(llm.scores[len(ids) - 1])
    assert ours.shape == theirs.shape == (256,)
    assert np.abs(ours[:250] - theirs[:250]).max() < 1e-3
