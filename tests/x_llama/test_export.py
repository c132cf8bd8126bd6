"""`x-llama export`, checked by the runtimes themselves: llama.cpp (through llama-cpp-python) reads our GGUF files,
tokenizes as we do, computes our logits and decodes our greedy tokens; transformers loads the `hf` directory; the
`meta` layout loads back."""

from __future__ import annotations

import math
import random
import unicodedata

import pytest
import torch
import transformers
from torch.testing import assert_close

from axon_shared.config import ConfigError
from x_llama.cli import main
from x_llama.config import ExportConfig
from x_llama.data import load_documents
from x_llama.export import export_gguf, llama_cpp_has_amx, open_in_llama_cpp
from x_llama.generation import generate
from x_llama.hf import load_meta_checkpoint
from x_llama.train import load_pretrained

from .conftest import tiny_train_args

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is in x_llama's test extra (make install)")

# (n_kv_heads, rope_theta): GQA with Llama 2's theta, and MQA with a non-default theta
RUNS = {"gqa": (2, 10000.0), "mqa-theta": (1, 500000.0)}


@pytest.fixture(scope="module", params=list(RUNS))
def trained_run(request, tmp_path_factory, tokenizer_path):
    """A 2-layer run trained for 60 steps (enough for peaked, non-uniform logits)."""
    n_kv_heads, theta = RUNS[request.param]
    out = tmp_path_factory.mktemp(request.param)
    args = tiny_train_args(tokenizer_path, out)
    args[args.index("--train.steps") + 1] = "60"
    args[args.index("--data.seq_len") + 1] = "64"
    main([*args, "--model.n_layers", "2", "--model.n_kv_heads", str(n_kv_heads), "--model.rope_theta", str(theta)])
    return out


def normal_texts(n: int) -> list[str]:
    """n lines of the valid split, NFKC-normalised with single spaces (what SentencePiece's normaliser would make
    of them; llama.cpp and transformers do not normalise: the export module's docstring)."""
    lines = [
        " ".join(unicodedata.normalize("NFKC", line).split()) for doc in load_documents("en-text", "valid") for line in doc.split("\n")
    ]
    lines = [line for line in lines if 20 <= len(line) <= 300]
    random.Random(0).shuffle(lines)
    return lines[:n]


def cpp_model(path, n_ctx: int):
    return open_in_llama_cpp(path, n_ctx, n_threads=2, logits_all=True, verbose=False, seed=0)


def cpp_logits(llm, ids: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.tensor(llm.scores[: len(ids)])


def test_llama_cpp_tokenizes_computes_and_decodes_like_us(trained_run, tmp_path):
    model, tokenizer, config = load_pretrained(trained_run)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", "f32")
    llm = cpp_model(path, config.max_seq_len)
    try:
        texts = normal_texts(100)
        for text in texts:  # the same ids, BOS included
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == tokenizer.encode(text, bos=True), text

        for text in texts[:5]:  # the same logits at every position (float32 on both sides, different kernels)
            ids = tokenizer.encode(text, bos=True)[: config.max_seq_len]
            with torch.no_grad():
                ours = model(torch.tensor([ids]))[0]
            assert_close(cpp_logits(llm, ids), ours, rtol=0, atol=2e-3)

        for prompt in ("And the LORD said", "It is a truth universally", "To be, or not"):  # greedy: the same 64 tokens
            ids = tokenizer.encode(prompt, bos=True)
            ours = generate(model, [ids], 64, temperature=0.0, eos_id=tokenizer.eos_id)[0]
            theirs = []
            for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                theirs.append(int(token))
                if token == tokenizer.eos_id or len(theirs) == 64:
                    break
            assert theirs == ours, prompt
    finally:
        llm.close()


def test_f16_and_q8_0_stay_close_to_f32(trained_run, tmp_path):
    """Quantised exports lose little: mean next-token loss on valid text within 1% (f16) and 2% (q8_0) of ours."""
    model, tokenizer, config = load_pretrained(trained_run)
    ids = [tokenizer.encode(text, bos=True)[: config.max_seq_len] for text in normal_texts(8)]

    def nll(logits: torch.Tensor, row: list[int]) -> float:
        return float(torch.nn.functional.cross_entropy(logits[:-1].double(), torch.tensor(row[1:])))

    with torch.no_grad():
        ours = sum(nll(model(torch.tensor([row]))[0], row) for row in ids) / len(ids)
    sizes = {}
    for dtype, tolerance in (("f32", 1e-4), ("f16", 0.01), ("q8_0", 0.02)):
        path = export_gguf(model, tokenizer, tmp_path / f"model-{dtype}.gguf", dtype)
        sizes[dtype] = path.stat().st_size
        llm = cpp_model(path, config.max_seq_len)
        try:
            theirs = sum(nll(cpp_logits(llm, row), row) for row in ids) / len(ids)
        finally:
            llm.close()
        assert abs(theirs - ours) / ours < tolerance, (dtype, theirs, ours)
        assert math.isfinite(theirs)
    assert sizes["q8_0"] < 0.6 * sizes["f16"] < 0.6 * sizes["f32"]


def test_hf_export_loads_in_transformers(trained_run, tmp_path):
    model, tokenizer, _ = load_pretrained(trained_run)
    main(["export", "--checkpoint", str(trained_run), "--format", "hf", "--out", str(tmp_path / "hf")])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in normal_texts(20):
        ids = tokenizer.encode(text, bos=True)
        assert hf_tokenizer(text)["input_ids"] == ids, text
    x = torch.tensor([tokenizer.encode(normal_texts(1)[0], bos=True)[:64]])
    with torch.no_grad():
        assert_close(hf_model(x).logits, model(x), rtol=1e-4, atol=1e-4)


def test_meta_export_round_trips(trained_run, tmp_path):
    model, _, _ = load_pretrained(trained_run)
    main(["export", "--checkpoint", str(trained_run), "--format", "meta", "--out", str(tmp_path / "meta")])
    assert (tmp_path / "meta" / "tokenizer.model").is_file()
    loaded = load_meta_checkpoint(tmp_path / "meta", max_seq_len=model.config.max_seq_len)
    x = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(loaded(x), model(x))


def test_open_in_llama_cpp_turns_repacking_off_for_one_call(trained_run, tmp_path):
    """repack=False reaches llama.cpp's model parameters, and the library's defaults are left as they were."""
    model, tokenizer, config = load_pretrained(trained_run)
    path = export_gguf(model, tokenizer, tmp_path / "model.gguf", "q8_0")
    for repack in (False, True):
        if repack and llama_cpp_has_amx():
            continue  # the crash open_in_llama_cpp avoids (llama.cpp issue #20824)
        llm = open_in_llama_cpp(path, config.max_seq_len, repack=repack, logits_all=True, verbose=False)
        try:
            assert llm.model_params.use_extra_bufts is repack
            assert llama_cpp.llama_cpp.llama_model_default_params().use_extra_bufts is True
            assert cpp_logits(llm, tokenizer.encode("And the LORD said", bos=True)).isfinite().all()
        finally:
            llm.close()


def test_export_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="format"):
        ExportConfig(format="onnx")
    with pytest.raises(ConfigError, match="dtype"):
        ExportConfig(format="hf", dtype="q8_0")
    with pytest.raises(ConfigError, match="dtype"):
        ExportConfig(dtype="q4_k")
