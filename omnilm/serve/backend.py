"""The server's one door to generation: a loaded model, its processor, and `submit` -> a request.

The interface is the engine's (omnilm.generation.Engine): `submit(prompt_ids, cfg, media, on_event)`
returns a request whose `events()` yields one Event per token and whose `cancel()` stops it; a full
queue raises QueueFullError at once. Until the continuous-batching engine is on this branch, one
worker thread runs requests one at a time through `model.stream` (which honours the demo's modality
spans), and computes logprobs with one scoring forward pass when a request asks for them.
torch is imported where it is used, so the server's socket opens before the import is done.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ContextLengthError, OmniLMError


class QueueFullError(OmniLMError):
    """More requests are waiting than the server's --max-queue: try again later (HTTP 429)."""


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    eos_token_id: int | list[int] | None = None
    stop_strings: tuple = ()
    guidance_scale: float | None = None
    logprobs: int | None = None  # top-n alternatives per token (0: the chosen token's logprob only)


@dataclass
class Event:
    token: int | None = None
    logprob: float | None = None
    top_logprobs: list = field(default_factory=list)  # [(token_id, logprob)] best first
    finish_reason: str | None = None  # "stop" | "length" | "error" on the last event
    error: str | None = None


class Request:
    def __init__(self, prompt_ids, cfg, media, on_event):
        self.prompt_ids, self.cfg, self.media = list(prompt_ids), cfg, media or {}
        self._events: queue.Queue = queue.Queue()
        self._on_event = on_event
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()

    def _emit(self, ev: Event):
        self._events.put(ev)
        if self._on_event is not None:
            self._on_event(ev)

    def events(self):
        """Blocking iterator over this request's events; ends after the one with a finish_reason."""
        while True:
            ev = self._events.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self):
        self.cancelled.set()


class Backend:
    """model + processor + generation, shared by every HTTP request of one server."""

    def __init__(self, model, processor, model_dir=None, max_batch: int = 16, max_queue: int = 64):
        self.model, self.processor = model, processor
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.max_batch, self.max_queue = max_batch, max_queue
        tok = processor.tokenizer
        self.eos_ids = [i for i in (tok.eos_token_id, tok.eot_token_id) if i is not None]
        self.context = model.config.decoder.max_seq_len
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.running = 0
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._loop, name="omnilm-generate", daemon=True)
        self._worker.start()

    @classmethod
    def load(cls, model, device=None, dtype=None, max_batch: int = 16, max_queue: int = 64) -> Backend:
        import omnilm

        from ..convert.hf import checkpoint_dir

        model_dir = checkpoint_dir(omnilm._resolve(model))
        processor = omnilm.load_processor(model_dir)
        net = omnilm.load(model_dir, device=device, dtype=dtype)
        return cls(net, processor, model_dir, max_batch=max_batch, max_queue=max_queue)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def page_use(self) -> float:
        return 0.0  # no paged KV pool before the engine

    def submit(self, prompt_ids, cfg: GenerationConfig, media=None, on_event=None) -> Request:
        if len(prompt_ids) + 1 > self.context:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.context}"
            )
        req = Request(prompt_ids, cfg, media, on_event)
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise QueueFullError(f"the server queue is full ({self.max_queue} waiting)") from None
        return req

    def stop(self, timeout: float = 5.0):
        self._stop.set()
        self._queue.put(None) if not self._queue.full() else None
        self._worker.join(timeout)

    # ---- the worker ----------------------------------------------------------------------------------

    def _loop(self):
        while not self._stop.is_set():
            req = self._queue.get()
            if req is None:
                return
            if req.cancelled.is_set():
                req._emit(Event(finish_reason="stop"))
                continue
            self.running = 1
            try:
                self._run(req)
            except Exception as e:  # one bad request fails alone
                msg = str(e) if isinstance(e, OmniLMError) else f"internal error: {type(e).__name__}: {e}"
                req._emit(Event(finish_reason="error", error=msg))
            finally:
                self.running = 0

    def _run(self, req: Request):
        import torch

        cfg, media = req.cfg, req.media
        ids = torch.tensor([req.prompt_ids])
        max_new = min(cfg.max_new_tokens, self.context - len(req.prompt_ids))
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else self.eos_ids
        eos_set = {eos} if isinstance(eos, int) else set(eos)
        settings = dict(
            max_new_tokens=max_new,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seed=cfg.seed,
            eos_token_id=sorted(eos_set),
            pixel_values=media.get("pixel_values"),
            input_features=media.get("input_features"),
        )
        if cfg.min_p is not None:
            settings["min_p"] = cfg.min_p
        if cfg.repetition_penalty is not None:
            settings["repetition_penalty"] = cfg.repetition_penalty
        if cfg.guidance_scale is not None:
            settings["guidance_scale"] = cfg.guidance_scale
        if cfg.presence_penalty or cfg.frequency_penalty:
            raise OmniLMError("presence_penalty and frequency_penalty are not supported by this server yet")
        tokens, finish = [], "length"
        steps = self.model.stream(ids, **settings)
        try:
            with torch.inference_mode():
                for t in steps:
                    if req.cancelled.is_set():
                        finish = "stop"
                        break
                    tok = int(t[0])
                    if tok in eos_set:
                        finish = "stop"
                        break
                    tokens.append(tok)
                    if cfg.logprobs is None:
                        req._emit(Event(token=tok))
                    if len(tokens) >= max_new:
                        break
        finally:
            steps.close()
        if cfg.logprobs is not None and not req.cancelled.is_set():
            scored = self.score(req.prompt_ids + tokens, media, cfg.logprobs)[len(req.prompt_ids) - 1 :]
            for tok, (lp, top) in zip(tokens, scored):
                req._emit(Event(token=tok, logprob=lp, top_logprobs=top))
        req._emit(Event(finish_reason=finish))

    def score(self, ids, media=None, top_n: int = 0):
        """[(logprob of ids[i], top_n alternatives)] for i = 1..len(ids)-1, from one forward pass."""
        import torch

        media = media or {}
        x = torch.tensor([ids], device=self.model.device)
        with torch.inference_mode():
            out = self.model(
                input_ids=x,
                pixel_values=media.get("pixel_values"),
                input_features=media.get("input_features"),
            )
        logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)  # (T-1, V)
        chosen = logp.gather(1, x[0, 1:, None])[:, 0].tolist()
        tops = [[]] * len(chosen)
        if top_n:
            values, index = logp.topk(top_n, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(index.tolist(), values.tolist())]
        return list(zip(chosen, tops))
