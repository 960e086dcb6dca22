"""The new families end to end, as a user runs them: a stock ``transformers`` directory (Qwen3;
Llama 3.x with ``llama3`` RoPE scaling) written by transformers itself, with a byte-level
tokenizer, goes through ``ecospa compress`` (calibration, pruning of every coupled kind, refit,
recovery) and ``--export-hf``; stock transformers loads the export and computes the compressed
checkpoint's logits, past the original context for Llama 3.x."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from ecospa import cli  # noqa: E402
from ecospa.func.families import family_of  # noqa: E402
from ecospa.io.checkpoint import load as load_checkpoint  # noqa: E402
from ecospa.io.load import load_model  # noqa: E402
from tolerances import EXACT, HF, close  # noqa: E402

CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(
        vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=12, intermediate_size=48, max_position_embeddings=256, tie_word_embeddings=True),
    "llama3": lambda: transformers.LlamaConfig(
        vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=256, rope_theta=500.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_transformers_directory_compresses_and_exports_back_exactly(tmp_path, kind, capsys):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    src = tmp_path / "src"
    model.save_pretrained(src)
    byte_tokenizer().save_pretrained(src)
    out, exp = tmp_path / "ck", tmp_path / "hf"
    rc = cli.main(["compress", "--model", str(src), "--out", str(out), "--budget", "0.4", "--steps", "2",
                   "--batch-size", "2", "--seq-len", "32", "--calib-batches", "1", "--eval-seq-len", "48",
                   "--eval-windows", "2", "--export-hf", str(exp)])
    assert rc == 0, capsys.readouterr().err
    params, cfg, _ = load_checkpoint(out)
    dense = model.num_parameters()
    kept = sum(x.numel() for x in torch.utils._pytree.tree_leaves(params) if x.is_floating_point())
    assert kept < dense  # pruned for real (every kind may shrink; the tree is smaller)
    assert (cfg.qk_norm, cfg.rope_scaling is not None) == ((True, False) if kind == "qwen3" else (False, True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(exp, attn_implementation="eager").eval()
    assert type(hf).__name__ == type(model).__name__
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > 16: past the original context
    want = family_of(cfg).forward(params, x, cfg)
    with torch.no_grad():
        close(hf(x).logits, want, HF)
    # the compact export (remote code, pruned shapes) computes it too, and loads back into ecospa
    assert cli.main(["export", "--model", str(out), "--format", "hf-compact", "--out", str(tmp_path / "hfc")]) == 0
    rc_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hfc", trust_remote_code=True).eval()
    assert rc_model.num_parameters() < model.num_parameters()
    with torch.no_grad():
        close(rc_model(x).logits, want, HF)
    cfg2, back, _ = load_model(str(tmp_path / "hfc"))
    assert (cfg2.qk_norm, cfg2.rope_scaling, cfg2.head_dim) == (cfg.qk_norm, cfg.rope_scaling, cfg.head_dim)
    close(family_of(cfg2).forward(back, x, cfg2), want, EXACT)
