"""Emu3's image grammar as a per-row logits processor, and text-to-image through the one engine.

An Emu3 image is, token by token: the size header `<|image start|>` + "h*w" + `<|image token|>`,
then h rows of w visual tokens each ended by the end-of-line token `<|extra_200|>`, then
`<|extra_201|>` (end of frame), `<|image end|>` and the end-of-sequence token. Every position of
that sequence is either one forced id or "any visual token", so the grammar is a table over
positions plus a (B,) position counter: `process(logits (B, V))` masks, `update(tokens (B,))`
advances, with no host reads (the shape of the SpanController in generation/processors.py, so the engine
hosts it in a request's processors). Classifier-free guidance runs the prompt and a null prompt as
the request and its unconditional twin; the engine mixes their logits before the grammar masks them.
"""

from __future__ import annotations

import math

import torch

from .config import GenerationConfig
from .engine import PAGE_SIZE, Engine

VISUAL = -1  # table entry: any visual token


class Emu3ImageGrammar:
    def __init__(self, header, height, width, visual_ids, eol_id, tail, vocab_size, batch=1, device=None):
        rows = ([VISUAL] * width + [eol_id]) * height
        self.sequence = [int(t) for t in header] + rows + [int(t) for t in tail]
        self.table = torch.tensor(self.sequence, dtype=torch.long, device=device)  # (L,)
        self.visual = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,)
        self.visual[torch.as_tensor(visual_ids, device=device)] = True
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)  # (B,) tokens emitted so far
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.sequence)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) with every id the grammar forbids at each row's position set to -inf; past the
        end a row may only repeat the last token (end of sequence)."""
        want = self.table[self.pos.clamp(max=len(self) - 1)]  # (B,)
        forced = torch.nn.functional.one_hot(want.clamp(min=0), logits.shape[-1]).bool()  # (B, V)
        allowed = torch.where((want == VISUAL)[:, None], self.visual[None], forced)
        return logits.masked_fill(~allowed, float("-inf"))

    def update(self, tokens: torch.Tensor):
        self.pos = self.pos + 1

    def codes(self, ids, bpe2img: torch.Tensor) -> torch.Tensor:
        """The generated grammar span (B, len) -> VQ codes (B, h, w): rows without their end-of-line."""
        start = self.sequence.index(VISUAL)  # the header length
        grid = ids[:, start : start + self.height * (self.width + 1)].reshape(-1, self.height, self.width + 1)
        return bpe2img[grid[..., :-1]]


def generate_grammar(model, prompt_ids, grammar, null_ids=None, guidance_scale=None, temperature=1.0, top_k=None,
                     top_p=None, seed=None):  # fmt: skip
    """Sample len(grammar) tokens after prompt_ids (list of ints) under the grammar, through an engine
    of its own, with the grammar as the request's first logits processor;
    -> (len,) ids. With guidance_scale, null_ids (the unconditional prompt) is the request's uncond
    twin and every token is sampled from uncond + scale * (cond - uncond), then masked by the grammar."""
    pages = 2 * math.ceil((len(prompt_ids) + len(grammar)) / PAGE_SIZE) + 2
    engine = Engine(model, max_batch=1, max_queue=1, num_pages=pages)
    config = GenerationConfig(
        max_new_tokens=len(grammar), temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        eos_token_id=[grammar.sequence[-1]], guidance_scale=guidance_scale,
    )  # fmt: skip
    uncond = list(null_ids) if guidance_scale is not None else None
    req = engine.submit(list(prompt_ids), config, uncond_ids=uncond, processors=[grammar])
    while engine.has_work():
        engine.step()
    if req.error is not None:
        raise req.error
    return torch.tensor(req.output)


def generate_image(
    model,
    processor,
    prompt: str,
    height: int,
    width: int,
    guidance_scale=None,
    temperature=1.0,
    top_k=None,
    top_p=None,
    seed=None,
):
    """Text-to-image with an Emu3 model: -> (PIL image of height x width, generated ids (len,), codes (h, w)).

    The grammar forces the size header, h rows of w visual tokens each ended by end-of-line, then end of
    frame, image end and end of sequence; the codes decode through the model's VQ-VAE."""
    h, w = processor.generation_grid(height, width)
    tok = processor.tokenizer
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = model.config.decoder.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    tail = [processor.ids["<|extra_201|>"], processor.ids["<|image end|>"]] + (
        [eos] if eos is not None else []
    )
    grammar = Emu3ImageGrammar(
        processor.header(h, w),
        h,
        w,
        processor.visual_ids,
        processor.ids["<|extra_200|>"],
        tail,
        model.config.decoder.vocab_size,
        device=model.device,
    )
    ids = generate_grammar(
        model,
        bos + tok.encode(prompt),
        grammar,
        null_ids=bos or [0],
        guidance_scale=guidance_scale,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
    )
    codes = grammar.codes(ids[None], processor.bpe2img)  # (1, h, w)
    pixels = model.vqmodel.decode(codes.to(model.device))  # (1, 3, H, W)
    return processor.to_image(pixels[0]), ids, codes[0]
