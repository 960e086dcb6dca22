"""``ecospa generate``: continue a prompt with a model, streaming tokens to the terminal.

    ecospa generate --model smollm2-135m --prompt "def fibonacci(n):" --max-new-tokens 64
    ecospa generate --model runs/smol50/checkpoint --prompt "..." --temperature 0.8 --top-k 40

``--temperature 0`` (the default) is greedy decoding. Any model spec that ``ecospa eval`` accepts
works (registry name, .gguf, Hugging Face directory, ecospa checkpoint), dense or pruned.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import optree
import torch

from ecospa._text import per_second
from ecospa.cli._options import MODEL_HELP, add_device, add_threads
from ecospa.errors import UsageError, nonneg_int, positive_int, seed_int, utf8_text
from ecospa.io import load
from ecospa.io.load import encode
from ecospa.jobs.generate import MIN_TEMPERATURE, check_options, generate


class _Streamer:
    """Prints the text of sequence 0 as tokens arrive (decodes the whole tail each time, so
    multi-byte characters split across tokens print once complete)."""

    def __init__(self, tokenizer, stream=None):
        self.tok, self.ids, self.printed, self.stream = tokenizer, [], "", stream or sys.stdout
        self.times = []  # when each token arrived (time.perf_counter)

    def __call__(self, nxt: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.ids.append(int(nxt[0]))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return
        self.stream.write(text[len(self.printed):])
        self.stream.flush()
        self.printed = text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, type=utf8_text, help="the text to continue (UTF-8)")
    p.add_argument("--max-new-tokens", type=nonneg_int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0,
                   help=f"0 = greedy, else a finite number >= {MIN_TEMPERATURE:g}")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="sample among the k most likely tokens (default: among all)")
    p.add_argument("--seed", type=seed_int, default=0, help="sampling seed, in [0, 2**63 - 1]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoder's layer function (two graphs shared by every layer; compiling "
                        "takes ~10-30 s on 2 idle CPU cores for SmolLM2-135M, dense or pruned, longer on a "
                        "busy machine; reported apart from tokens/s; on CPU decode gains ~0-20%%)")
    add_device(p)
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    check_options(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, params, tok = load.load_model(args.model)
    if tok is None or not hasattr(tok, "decode"):
        raise ValueError(f"model {args.model!r} has no tokenizer to turn the prompt into tokens "
                         "(give a GGUF with tokenizer metadata, an HF directory with tokenizer files, "
                         "or an ecospa checkpoint that records its tokenizer)")
    ids = encode(tok, args.prompt)[None].to(args.device)
    if ids.shape[1] == 0:
        raise UsageError("the prompt encodes to no tokens; give some text")
    params = optree.tree_map(lambda x: x.to(args.device), params, namespace="")
    if args.compile:
        where = "CPU" if str(args.device) == "cpu" else str(args.device)
        print(f"compiling the model: this takes about {COMPILE_GUESS_S} s to minutes on {where} the "
              "first time (reported apart from tokens/s)", file=sys.stderr, flush=True)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    streamer, ready = _Streamer(tok), []
    t0 = time.perf_counter()
    out = generate(params, cfg, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   on_token=streamer, compile=args.compile,
                   on_ready=lambda: ready.append(time.perf_counter()))
    t_end = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    print("\n" + timing(n, ids.shape[1], t0, t_end, ready[0] if ready else None, streamer.times,
                        args.compile), file=sys.stderr)
    return 0


COMPILE_GUESS_S = 20  # SmolLM2-135M on 2 idle CPU cores: 10-27 s (benchmarks/compile_decode.py)


def timing(n: int, prompt: int, t0: float, t_end: float, ready: Optional[float], times: list,
           compiled: bool) -> str:
    """'[N tokens in Ts, R tokens/s, prompt P tokens]'; with ``compiled`` the compile time (up to
    ``ready``, when both graphs exist) is given apart and tokens/s counts only the tokens after it
    (the intervals between them: every one a full decode step)."""
    after = [t for t in times if ready is not None and t > ready]
    steady = per_second(len(after) - 1, after[-1] - after[0], "tokens") if len(after) >= 2 else None
    if not compiled:
        rate = steady or per_second(n, t_end - t0, "tokens")
        return f"[{n} tokens in {t_end - t0:.2f}s, {rate}, prompt {prompt} tokens]"
    spent = (ready if ready is not None else t_end) - t0
    rate = steady or "tokens/s n/a (too few tokens after compiling: ask for more with --max-new-tokens)"
    return (f"[{n} tokens in {t_end - t0:.2f}s: compiling {spent:.1f}s (prefill and step graphs, with "
            f"their first runs), then {rate}, prompt {prompt} tokens]")


__all__ = ["add_arguments", "run", "timing"]
