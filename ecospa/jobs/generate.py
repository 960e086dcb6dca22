"""Text generation with the KV-cache decoder (``ecospa generate`` is ``ecospa.cli.generate``).

``temperature=0`` (the default) is greedy decoding; ``on_token`` streams each new column.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ecospa.errors import SEED_MAX, UsageError, whole
from ecospa.func.decode import compiled_decoder, decode, init_cache


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax when temperature == 0, else softmax sampling
    at ``temperature`` restricted to the ``top_k`` most likely tokens (all when None)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


MIN_TEMPERATURE = 1e-4  # below it, logits / temperature overflows float32 (inf, then NaN)


def check_options(max_new_tokens: int, temperature: float, top_k: Optional[int], seed: int = 0) -> None:
    """UsageError for options ``generate`` cannot honour: ``max_new_tokens`` >= 0; ``temperature``
    0 (greedy) or a finite number >= MIN_TEMPERATURE; ``top_k`` >= 1; ``seed`` in [0, 2**63-1]."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if not (temperature == 0 or MIN_TEMPERATURE <= temperature < float("inf")):
        raise UsageError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, "
                         f"got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    if not (whole(seed) and 0 <= seed <= SEED_MAX):
        raise UsageError(f"seed must be a whole number in [0, 2**63 - 1], got {seed!r}")


def generate(params: dict, cfg, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, seed: int = 0, eos_id: Optional[int] = None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None, compile: bool = False,
             on_ready: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Prompt [B, T] followed by up to ``max_new_tokens`` generated tokens: [B, T + N].

    One prefill call, then one ``decode`` call per token with a fixed-size cache and the position
    as a tensor. ``compile=True`` compiles the LAYER function with dynamic shapes
    (``ecospa.func.decode.compiled_decoder``): two graphs (prefill, step) shared by every layer
    whatever its pruned widths, and no recompile per token. Generation stops early when every sequence has produced ``eos_id``. ``on_token`` gets
    each new column [B] as it is produced (for streaming). ``on_ready()`` is called once, when the
    prefill and the first step have run (with ``compile=True``: both graphs are compiled), so a
    caller can time compilation apart from decoding (tokens after it run at the steady speed).
    """
    check_options(max_new_tokens, temperature, top_k, seed)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise UsageError(f"prompt must be [batch, tokens] with at least one token, got {tuple(prompt.shape)}")
    B, T = prompt.shape
    total = T + max_new_tokens
    if total > cfg.max_seq_len:
        raise UsageError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"the model's max_seq_len {cfg.max_seq_len}: shorten the prompt or ask for fewer tokens")
    if max_new_tokens == 0:
        return prompt
    step = compiled_decoder(cfg) if compile else decode
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    cache = init_cache(params, cfg, B, total)
    out = [prompt]
    done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
    with torch.no_grad():
        logits, cache = step(params, cache, prompt, torch.tensor(0), cfg, inplace=True)
        for i in range(max_new_tokens):
            nxt = sample(logits[:, -1], temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out.append(nxt[:, None])
            if on_token is not None:
                on_token(nxt)
            if i + 1 == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits, cache = step(params, cache, nxt[:, None], torch.tensor(T + i), cfg, inplace=True)
            if i == 0 and on_ready is not None:
                on_ready()
    return torch.cat(out, dim=1)


def greedy_reference(forward: Callable, params: dict, cfg, prompt: torch.Tensor,
                     max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding by re-running the full forward on the whole sequence for every token:
    slow and obviously right; the cached decoder must produce the same tokens."""
    seq = prompt
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = forward(params, seq, cfg)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
    return seq


__all__ = ["generate", "sample", "greedy_reference", "check_options"]
