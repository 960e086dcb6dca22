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

import optree
import torch

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

    def __call__(self, nxt: torch.Tensor) -> None:
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
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (two graphs)")
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
    sys.stdout.write(args.prompt)
    t0 = time.perf_counter()
    out = generate(params, cfg, ids, args.max_new_tokens, args.temperature, args.top_k, args.seed,
                   on_token=_Streamer(tok), compile=args.compile)
    dt = time.perf_counter() - t0
    n = out.shape[1] - ids.shape[1]
    print(f"\n[{n} tokens in {dt:.2f}s, {n / max(dt, 1e-9):.1f} tokens/s, prompt {ids.shape[1]} tokens]",
          file=sys.stderr)
    return 0


__all__ = ["add_arguments", "run"]
