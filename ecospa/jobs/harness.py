"""lm-evaluation-harness adapter: score any ecospa model (dense or pruned) with ``lm-eval``.

    python -m ecospa.cli.harness --model runs/smol50/checkpoint --tasks hellaswag,arc_easy
    # or, from Python:
    import lm_eval
    from ecospa.jobs.harness import EcospaLM
    lm_eval.simple_evaluate(model=EcospaLM("smollm2-135m"), tasks=["hellaswag"])

Needs the optional extra: ``pip install 'ecospa[eval]'`` (lm-eval). Its built-in tasks download
their datasets from the Hugging Face Hub; offline, only local tasks run (``--include-path``).
The ``hf-padded`` export works with lm-eval's own ``hf`` model type as well
(``lm_eval --model hf --model_args pretrained=DIR``).

Conventions (so scores agree with ``ecospa eval``): ``loglikelihood_rolling`` scores every token
after the first, in the same non-overlapping windows of ``max_length`` predictions that
``ecospa.io.data.windows`` defines (a shorter last window covers the tail); ``loglikelihood`` conditions a
continuation on the last ``max_length`` tokens of context + continuation; ``generate_until``
keeps the last context tokens that leave room for ``max_gen_toks`` new ones in ``max_length``
(at least one; fewer new tokens when ``max_gen_toks`` alone fills the window). ``max_length``
may not exceed the model's ``max_seq_len``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError("ecospa.jobs.harness needs lm-eval: pip install 'ecospa[eval]'",
                              name=err.name) from err

from ecospa.errors import UsageError
from ecospa.func.families import family_of
from ecospa.io import load
from ecospa.io.load import encode
from ecospa.jobs.generate import generate


@register_model("ecospa")
class EcospaLM(LM):
    """lm-eval ``LM`` over an ecospa model spec (registry name, .gguf, HF dir, checkpoint), or
    over a loaded ``(cfg, params, tokenizer)`` given as ``loaded=``."""

    def __init__(self, model: Optional[str] = None, max_length: Optional[int] = None,
                 batch_size: int = 8, loaded: Optional[tuple] = None, **_):
        super().__init__()
        if loaded is None:
            if model is None:
                raise ValueError("give model=SPEC (registry name, .gguf, HF directory or ecospa checkpoint)")
            loaded = load.load_model(model)
        self.cfg, self.params, self.tok = loaded
        if self.tok is None:
            raise ValueError("this model has no tokenizer; lm-eval needs text in and out")
        self.forward = family_of(self.cfg).forward
        self.max_length = int(max_length or min(self.cfg.max_seq_len, 2048))
        if self.max_length > self.cfg.max_seq_len:  # GPT-2 has no positions past it, LLaMA was not trained there
            raise UsageError(f"max_length {self.max_length} exceeds the model's window of {self.cfg.max_seq_len} "
                             f"positions (max_seq_len); use --max-length {self.cfg.max_seq_len} or less")
        self.batch_size = int(batch_size)

    # -- helpers -----------------------------------------------------------------------------
    def _ids(self, text: str) -> list:
        return encode(self.tok, text).tolist() if text else []

    def _logprobs(self, seqs: list) -> list:
        """Per sequence (list of ids, len >= 2): log p(ids[i] | ids[:i]) for i >= 1."""
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i:i + self.batch_size]
            T = max(len(s) for s in chunk)
            batch = torch.zeros(len(chunk), T, dtype=torch.long)
            for j, s in enumerate(chunk):
                batch[j, :len(s)] = torch.tensor(s)  # right padding: causal, so it never leaks back
            with torch.no_grad():
                logp = F.log_softmax(self.forward(self.params, batch[:, :-1], self.cfg).float(), -1)
            tgt = logp.gather(-1, batch[:, 1:, None])[..., 0]
            greedy = logp.argmax(-1) == batch[:, 1:]
            out += [(tgt[j, :len(s) - 1], greedy[j, :len(s) - 1]) for j, s in enumerate(chunk)]
        return out

    # -- the LM interface --------------------------------------------------------------------
    def loglikelihood(self, requests) -> list:
        seqs, spans = [], []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._ids(context), self._ids(continuation)
            if not cont:
                raise ValueError(f"empty continuation for context {context[-40:]!r}")
            if not ctx:  # nothing to condition on: the first continuation token is unscorable
                ctx, cont = cont[:1], cont[1:] or cont[:1]
            seq = (ctx + cont)[-(self.max_length + 1):]
            seqs.append(seq)
            spans.append(min(len(cont), len(seq) - 1))
        results = []
        for (lp, greedy), n in zip(self._logprobs(seqs), spans):
            results.append((float(lp[-n:].sum()), bool(greedy[-n:].all())))
        return results

    def loglikelihood_rolling(self, requests) -> list:
        out = []
        for req in requests:
            ids = self._ids(req.args[0])
            T = self.max_length
            wins = [ids[s:s + T + 1] for s in range(0, max(len(ids) - 1, 0), T)]
            wins = [w for w in wins if len(w) >= 2]
            out.append(float(sum(lp.sum() for lp, _ in self._logprobs(wins))) if wins else 0.0)
        return out

    def generate_until(self, requests) -> list:
        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            # the last context tokens that leave room for the generation in the window (at least one)
            ids = self._ids(context)[-max(1, self.max_length - max_new):] or [0]
            max_new = min(max_new, self.max_length - len(ids))
            seq = generate(self.params, self.cfg, torch.tensor([ids]), max_new, temperature)
            text = self.tok.decode(seq[0, len(ids):].tolist())
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            out.append(text)
        return out


__all__ = ["EcospaLM"]
