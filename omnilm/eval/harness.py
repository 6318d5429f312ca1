"""An lm-evaluation-harness model over any OmniLM model (text prompts; greedy generation):

    from omnilm.eval.harness import OmniLMHarness
    lm_eval.simple_evaluate(model=OmniLMHarness("path/to/model"), tasks=["hellaswag"])

Importing this module imports lm_eval (`pip install lm_eval`); nothing else in OmniLM does.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


class OmniLMHarness(LM):
    def __init__(self, model, tokenizer=None, max_length: int | None = None, quantize: str | None = None):
        """model: a loaded model (then `tokenizer` is its TextTokenizer) or a model directory / "demo"."""
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            from ..api import load, load_processor

            tokenizer = tokenizer or load_processor(model).tokenizer
            model = load(model, quantize=quantize)
        self.model, self.tok = model.eval(), tokenizer
        self.max_length = max_length or model.config.decoder.max_seq_len
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text) if text else []

    @torch.no_grad()
    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum of log p(continuation | context) and whether greedy decoding would produce it."""
        ids = (context + continuation)[-(self.max_length + 1) :]
        inp = torch.tensor([ids[:-1]], device=self.model.device)
        logits = self.model(input_ids=inp).logits[0, -len(continuation) :].float()  # (C, V)
        logprobs = torch.log_softmax(logits, -1)
        target = torch.tensor(continuation, device=logits.device)
        total = float(logprobs.gather(-1, target[:, None]).sum())
        return total, bool((logprobs.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            # split the joint encoding, so a BPE merge across the boundary scores as the model sees it
            whole = self._encode(context + continuation)
            n_ctx = len(self._encode(context))
            if n_ctx >= len(whole):
                n_ctx = len(whole) - 1
            out.append(self._score([self.bos] + whole[:n_ctx], whole[n_ctx:]))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = get_rolling_token_windows(
                token_list=self._encode(text),
                prefix_token=self.bos,
                max_seq_len=self.max_length,
                context_len=1,
            )
            out.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
        return out

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        out = []
        eos = [i for i in (self.tok.eos_token_id, getattr(self.tok, "eot_token_id", None)) if i is not None]
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = ([self.bos] + self._encode(context))[-self.max_length :]
            room = max(1, min(int(kwargs.get("max_gen_toks", 256)), self.max_length - len(ids)))
            new = self.model.generate(
                torch.tensor([ids], device=self.model.device), max_new_tokens=room, eos_token_id=eos or None
            )[0, len(ids) :].tolist()
            text = self.tok.decode(new)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out
