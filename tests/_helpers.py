"""Helpers that several test files share (no optional dependency is imported here)."""
from __future__ import annotations

import torch


def hf_llama_state_dict(c: dict, seed: int = 0) -> dict:
    """A random LLaMA state dict under transformers' names ("model.layers.0.self_attn.q_proj.
    weight", ...) for the HF config dict ``c`` (weights ~ N(0, 0.2^2), norms around 1)."""
    g = torch.Generator().manual_seed(seed)
    D, hd, F_ = c["hidden_size"], c["head_dim"], c["intermediate_size"]
    H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]

    def w(*s):
        return torch.randn(*s, generator=g) * 0.2

    sd = {"model.embed_tokens.weight": w(c["vocab_size"], D), "model.norm.weight": 1 + w(D)}
    if not c["tie_word_embeddings"]:
        sd["lm_head.weight"] = w(c["vocab_size"], D)
    for i in range(c["num_hidden_layers"]):
        n = f"model.layers.{i}."
        sd.update({n + "self_attn.q_proj.weight": w(H * hd, D), n + "self_attn.k_proj.weight": w(Hkv * hd, D),
                   n + "self_attn.v_proj.weight": w(Hkv * hd, D), n + "self_attn.o_proj.weight": w(D, H * hd),
                   n + "mlp.gate_proj.weight": w(F_, D), n + "mlp.up_proj.weight": w(F_, D),
                   n + "mlp.down_proj.weight": w(D, F_), n + "input_layernorm.weight": 1 + w(D),
                   n + "post_attention_layernorm.weight": 1 + w(D)})
    return sd


def write_mc_task(directory, name: str, rows: list) -> None:
    """A local lm-eval multiple-choice task ``name`` in ``directory`` (its YAML and a jsonl with
    ``rows`` of {"question", "choices", "label"}): runs offline with ``include_path=directory``."""
    import json
    import pathlib
    import textwrap

    directory = pathlib.Path(directory)
    data = directory / f"{name}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (directory / f"{name}.yaml").write_text(textwrap.dedent(f"""
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
    """))


def exit_and_stderr(main, argv, capsys) -> tuple:
    """(exit code, stderr) of a command-line ``main(argv)``, argparse's SystemExit included."""
    try:
        rc = main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    return rc, capsys.readouterr().err


def one_line(err: str) -> str:
    """The one line of an error message (no traceback, nothing else on stderr)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def spy_stages(setattr, job_mod) -> dict:
    """Record what each stage of ``ecospa compress`` consumes, at the call that consumes it:
    {"fisher" / "obs" / "refit": [the batches of each call], "recover": [each recovery step's
    batch], "ppl": [(token stream, keyword arguments) of each perplexity]}. ``setattr`` is
    ``monkeypatch.setattr`` (or a ``pytest.MonkeyPatch()``'s), ``job_mod`` ``ecospa.jobs.compress``."""
    seen = {k: [] for k in ("fisher", "obs", "refit", "recover", "ppl")}

    def spy(name, stage, index):
        real = getattr(job_mod, name)
        setattr(job_mod, name, lambda *a, **k: (seen[stage].append(list(a[index])), real(*a, **k))[1])

    spy("fisher", "fisher", 3)
    spy("obs_scores", "obs", 3)
    spy("reconstruct", "refit", 3)
    real_fused = job_mod.obs_refit

    def obs_refit(*a, **k):  # the obs scores and the refit in one pass: both stages read its batches
        seen["obs"].append(list(a[4]))
        seen["refit"].append(list(a[4]))
        return real_fused(*a, **k)

    setattr(job_mod, "obs_refit", obs_refit)
    real_step, real_ppl = job_mod.make_step, job_mod.perplexity

    def make_step(loss, opt, **kw):
        step = real_step(loss, opt, **kw)
        return lambda p, s, batch: (seen["recover"].append(batch), step(p, s, batch))[1]

    def perplexity(forward, params, cfg, ids, **kw):
        seen["ppl"].append((ids, kw))
        return real_ppl(forward, params, cfg, ids, **kw)

    setattr(job_mod, "make_step", make_step)
    setattr(job_mod, "perplexity", perplexity)
    return seen
