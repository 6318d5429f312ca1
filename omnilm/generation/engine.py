"""The one generation engine: continuous batching over a paged KV cache.

Every path (model.generate, model.stream, the Pipeline, the server) submits requests here. A request
is a prompt (token ids), its media tensors, its own GenerationConfig, its own seeded generator and its
own logits processors (processors.py). Between decode steps the scheduler admits waiting requests,
prefills them (in chunks, interleaved with the decoding of the others) and retires finished or
cancelled ones, returning their pages at once.

    engine = Engine(model, max_batch=16, max_queue=64)
    req = engine.submit(prompt_ids, GenerationConfig(max_new_tokens=32), media={"pixel_values": px})
    engine.start()                       # or drive it yourself: while engine.has_work(): engine.step()
    for ev in req.events(): ...          # ev.token, ev.logprob, ev.top_logprobs, ev.finish_reason

Admission reserves the pages a request can ever need (prompt plus max_new_tokens, capped by the
context), so a running request never waits for memory and nothing is preempted; a request that does
not fit yet waits in a bounded queue, and a full queue is a QueueFullError at submit.

Why a batch gives each request exactly the tokens it gets alone: prefill runs one request at a time,
decode rows attend only to their own pages (a per-row mask), and sampling is per row with the
request's own generator and processors. Works on token ids and tensors only: text (detokenizing,
stop strings) is the Pipeline's business.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import ContextLengthError, OmniLMError, QueueFullError
from .config import GenerationConfig
from .paged import Lanes, PagedKV, PagePool, prefix_hashes
from .processors import IMAGE_CODES, Penalties, SpanController, guide, null_prompt
from .sampling import sample

PAGE_SIZE = 16
PREFILL_CHUNK = 512  # prompt tokens prefilled per engine step: long prompts do not stall decoding
BATCHED_MEDIA = {"pixel_values", "input_features"}  # encoded for several requests in one batch


@dataclass
class Event:
    """One sampled token of a request (token is None on the closing event of a cancel or error)."""

    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" on the last event
    error: Exception | None = None
    text: str = ""  # the new text, filled by a layer above that detokenizes (the Pipeline)


@dataclass
class Sequence:
    """One row of KV: the request itself, or its unconditional twin under guidance."""

    ids: list[int]  # prompt, then every token fed so far
    pages: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the pages
    embeds: torch.Tensor | None = None  # (T, D) prompt embeddings, media scattered in (prefill only)
    state: object = None  # the model's per-request state (model.request_state), e.g. Mllama's image k/v


class Request:
    _ids = itertools.count()

    def __init__(self, prompt_ids, config: GenerationConfig, media, on_event, uncond_ids=None, processors=()):
        self.id = next(Request._ids)
        self.config = config
        self.prompt_ids = list(prompt_ids)
        self.media = {k: v for k, v in (media or {}).items() if v is not None}
        self.on_event = on_event
        self.seqs = [Sequence(list(prompt_ids))]
        self.uncond_ids = uncond_ids
        self.output: list[int] = []
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.cancel_reason: str | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.done = threading.Event()
        # set by the engine at admission
        self.max_new = 0
        self.eos: set[int] = set()
        self.generator = None
        self.processors: list = list(processors)  # a family's own rules (Emu3's image grammar) come first
        self.spans: SpanController | None = None
        self.only: str | None = None  # "image": the whole output is one image span (image head only)

    @property
    def finished(self) -> bool:
        return self.done.is_set()

    def cancel(self, reason: str = "cancelled"):
        """Stop this request; the engine frees its pages before its next step (safe from any thread,
        and from inside on_event)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def events(self, timeout: float | None = None):
        """Block and yield this request's events until its last one (finish_reason set)."""
        while True:
            ev = self._queue.get(timeout=timeout)
            yield ev
            if ev.finish_reason is not None:
                return

    def _emit(self, ev: Event):
        if ev.finish_reason is not None:
            self.finish_reason, self.error = ev.finish_reason, ev.error
        if self.on_event is not None:
            self.on_event(ev)
        self._queue.put(ev)
        if ev.finish_reason is not None:
            self.done.set()


class Engine:
    def __init__(
        self,
        model,
        max_batch: int = 16,
        max_queue: int = 64,
        page_size: int = PAGE_SIZE,
        num_pages: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        compile: bool = False,
        prefix_caching: bool = False,
    ):
        """compile: the decode forward under torch.compile with dynamic batch and length (inductor;
        worth it where per-op overhead dominates: small models, CPU). prefix_caching: prompts that
        start like an earlier one (a system prompt) reuse its full pages of keys/values (text-only
        prompts; the rest of the prompt is then prefilled against them)."""
        self.prefix_caching = prefix_caching
        self.model = model
        self._decode_forward = torch.compile(self._forward, dynamic=True) if compile else self._forward
        dec = model.config.decoder
        self.ctx = dec.max_seq_len
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        if num_pages is None:  # room for a full batch of full-context requests
            num_pages = max_batch * math.ceil(self.ctx / page_size)
        self.pool = PagePool(num_pages)
        # A model with per-request state (cross-attention to images, computed once per request) has
        # `request_state(ids, **media)`; the engine keeps the state and hands it back, in row order,
        # to every forward as `request_states`. Such a model may also have fewer KV layers than layers.
        self.stateful = hasattr(model, "request_state")
        n_layers = getattr(model, "num_kv_layers", dec.num_layers)
        self.kv = PagedKV(
            n_layers, dec.num_kv_heads, dec.head_dim, num_pages, page_size, model.dtype, model.device
        )
        self.page_size = page_size
        self.device = model.device
        self.lanes = None if compile else Lanes(self.kv, max_batch, self.ctx)
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.after_step = None  # called by the background thread after each step (and its events)

    # ---- the caller's side -------------------------------------------------------------------------

    def submit(self, prompt_ids, config: GenerationConfig | None = None, media=None, on_event=None,
               uncond_ids=None, processors=()) -> Request:  # fmt: skip
        """Queue a request. Raises at once: ContextLengthError (prompt over the context, or more pages
        than the pool has), QueueFullError (the waiting queue is full)."""
        config = config or GenerationConfig()
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise OmniLMError("empty prompt: at least one token is needed")
        T = len(prompt_ids)
        if T >= self.ctx:
            raise ContextLengthError(
                f"prompt of {T} tokens does not fit the context of {self.ctx} tokens (one new token needs {T + 1})"
            )
        vocab = self.model.config.decoder.vocab_size
        disc = self.model.config.discrete
        if disc is not None:
            vocab = disc.vocab_size
        ca = self.model.config.cross_attention
        if ca is not None:  # Mllama: <|image|> and friends are embedding rows past the head's vocabulary
            vocab += ca.extra_embeddings
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise OmniLMError(
                f"prompt token ids must be in [0, {vocab}); got {min(prompt_ids)}..{max(prompt_ids)}"
            )
        if uncond_ids is not None and not 0 < len(uncond_ids) < self.ctx:
            raise OmniLMError(
                f"the unconditional prompt needs 1 to {self.ctx - 1} tokens, got {len(uncond_ids)}"
            )
        if config.guided and disc is None and uncond_ids is None:
            raise OmniLMError(
                "guidance_scale: this model does not generate images (it has no discrete config)"
            )
        req = Request(prompt_ids, config, media, on_event, uncond_ids, processors)
        need = self._pages_needed(req)
        if need > self.pool.num_pages:
            raise ContextLengthError(
                f"request needs {need} KV pages of {self.page_size} tokens but the engine has {self.pool.num_pages}"
            )
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); try again later")
            self.waiting.append(req)
            self._wake.notify()
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    def start(self):
        """Drive the engine from a background thread until stop()."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="omnilm-engine", daemon=True)
            self._thread.start()

    def stop(self, cancel: bool = True):
        """Stop the background thread; cancel what is still queued or running (their events close)."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if cancel:
            for req in [*self.waiting, *self.prefilling, *self.running]:
                req.cancel("cancelled")
            self.step(admit=False)

    def _loop(self):
        while True:
            with self._lock:
                while not self._stopping and not self.has_work():
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a fault in the step itself (out of memory, a bug): every request
                # in flight ends with the error instead of waiting forever; the engine goes on
                self.fail_all(e)
            finally:
                if (
                    self.after_step is not None
                ):  # e.g. the server's engine process sends a step's events at once
                    self.after_step()

    def fail_all(self, error: Exception):
        with self._lock:
            queued, self.waiting = list(self.waiting), deque()
        for req in [*self.prefilling, *self.running]:
            self._finish(req, Event(None, finish_reason="error", error=error))
        for req in queued:
            req._emit(Event(None, finish_reason="error", error=error))

    # ---- one step ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self, admit: bool = True):
        """Retire cancelled requests, admit waiting ones, prefill up to prefill_chunk prompt tokens,
        then decode one token for every running request."""
        for req in [r for r in (*self.prefilling, *self.running) if r.cancel_reason]:
            self._finish(req, Event(None, finish_reason=req.cancel_reason))
        with self._lock:
            for req in [r for r in self.waiting if r.cancel_reason]:
                self.waiting.remove(req)
                req._emit(Event(None, finish_reason=req.cancel_reason))
            while admit and self.waiting and len(self.prefilling) + len(self.running) < self.max_batch:
                if self._pages_needed(self.waiting[0]) > self.pool.free:
                    break  # first come, first served: later requests wait too
                self._admit(self.waiting.popleft())
        budget = self.prefill_chunk
        # fresh prompts (a cached prefix included) that fit this step whole: prefilled together, grouped
        # by (cached, length); a request already part-way through its chunks goes on alone below
        whole = []
        for req in self.prefilling:
            n = sum(len(seq.ids) - seq.cached for seq in req.seqs)
            started = any(seq.embeds is not None for seq in req.seqs)
            if n > budget or started or set(req.media) - BATCHED_MEDIA:
                break
            if self.stateful and req.media:  # its state is made alone, in _prefill
                break
            whole.append(req)
            budget -= n
        self._prefill_whole(whole)
        for req in list(self.prefilling):  # then long prompts, a chunk at a time
            if budget <= 0:
                break
            if req not in whole:
                budget -= self._prefill(req, budget)
        if self.running:
            self._decode()

    def _pages_needed(self, req: Request) -> int:
        """Pages for the prompt plus every token it may generate; under guidance, for its twin too
        (the null prompt is never longer than the prompt; a given uncond prompt counts as it is)."""
        max_new = min(req.config.max_new_tokens, self.ctx - len(req.prompt_ids))
        pages = self._pages_for(len(req.prompt_ids), max_new)
        if req.config.guided:
            pages += self._pages_for(len(req.uncond_ids or req.prompt_ids), max_new)
        return pages

    def _pages_for(self, prompt_len: int, max_new: int) -> int:
        return math.ceil((prompt_len + max_new) / self.page_size)

    def _admit(self, req: Request):
        cfg, model = req.config, self.model
        dec, disc = model.config.decoder, model.config.discrete
        T = len(req.prompt_ids)
        req.max_new = min(cfg.max_new_tokens, self.ctx - T)
        eos = dec.eos_token_id if cfg.eos_token_id is None else cfg.eos_token_id
        req.eos = {eos} if isinstance(eos, int) else set(eos or ())
        if cfg.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        ids = torch.tensor([req.prompt_ids], device=self.device)
        vocab = disc.vocab_size if disc is not None else dec.vocab_size
        if Penalties.needed(cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty):
            req.processors.append(Penalties(vocab, req.prompt_ids, cfg.repetition_penalty, cfg.presence_penalty,
                                            cfg.frequency_penalty, self.device))  # fmt: skip
        if disc is not None:
            req.spans = SpanController.from_prompt(disc, ids)
            if req.spans.state == IMAGE_CODES and req.spans.left >= req.max_new:
                req.only = "image"
            if cfg.guided:
                uncond = req.uncond_ids or null_prompt(disc, ids, dec.bos_token_id)[0]
                req.seqs.append(Sequence(list(uncond) or [req.prompt_ids[-1]]))
        elif cfg.guided:  # a family's own grammar (Emu3) guides every token against the given uncond prompt
            req.seqs.append(Sequence(list(req.uncond_ids)))
        for seq in req.seqs:
            total = self._pages_for(len(seq.ids), req.max_new)
            if self.prefix_caching and not req.media and len(req.seqs) == 1:
                # at least the last prompt token is computed: its logits give the first new token
                hashes = prefix_hashes(seq.ids, self.page_size, (T - 1) // self.page_size)
                seq.pages = self.pool.lookup(hashes)
                seq.cached = len(seq.pages) * self.page_size
            seq.pages += self.pool.allocate(total - len(seq.pages))
        self.prefilling.append(req)

    def _prefill(self, req: Request, budget: int) -> int:
        """Prefill up to `budget` prompt tokens of req; once its whole prompt is in, sample its first
        token and move it to the running set. Returns the tokens processed."""
        model, done = self.model, 0
        try:
            for i, seq in enumerate(req.seqs):
                T = len(seq.ids)
                if seq.cached >= T:
                    continue
                if seq.embeds is None:  # media are encoded once, at the first chunk
                    ids = torch.tensor([seq.ids], device=self.device)
                    media = req.media if i == 0 else {}
                    seq.embeds = model.embed(ids, **media)[0]  # (T, D)
                    if self.stateful and media:
                        seq.state = model.request_state(ids, **media)
                n = min(T - seq.cached, budget - done)
                if n <= 0:
                    return done
                start, end = seq.cached, seq.cached + n
                write = torch.tensor(self.kv.slots(seq.pages, start, end), device=self.device)
                read = self._read_pages([seq], end)  # (1, n_pages)
                mask = None  # a fresh prompt in one chunk: plain causal attention (SDPA's flash kernel)
                if start > 0:  # a later chunk: its queries see every earlier key and the causal part
                    q = torch.arange(start, end, device=self.device)
                    mask = (torch.arange(end, device=self.device)[None, :] <= q[:, None])[None, None]
                out = model(
                    inputs_embeds=seq.embeds[None, start:end],
                    attention_mask=mask,
                    position_ids=torch.arange(start, end, device=self.device)[None],
                    cache=self.kv.view(write, read, end),
                    cache_position=torch.arange(start, end, device=self.device),
                    kv_len=end,
                    logits_slice=slice(-1, None),
                    **({"logits_modality": req.only} if req.only else {}),
                    **({"request_states": [seq.state]} if self.stateful else {}),
                )
                seq.cached, done = end, done + n
                if end == T:
                    seq.embeds = None
                    seq.last_logits = out.logits[:, -1]  # (1, V)
        except OmniLMError as e:  # this request's media or shapes are wrong: it fails alone
            self._finish(req, Event(None, finish_reason="error", error=e))
            return done
        if all(seq.cached >= len(seq.ids) for seq in req.seqs):
            self._start(req)
        return done

    def _prefill_whole(self, reqs: list[Request]):
        """Prefill whole fresh prompts, one forward per (cached prefix, prompt length): rows alike in
        both need no padding, so each row computes exactly what it computes alone. The media of a
        group are encoded in one batch too (scattered in row order). A group whose forward fails (a
        request with bad media) is redone one request at a time, so the bad one fails alone."""
        groups: dict[tuple[int, int], list] = {}
        for req in reqs:
            for i, seq in enumerate(req.seqs):
                groups.setdefault((seq.cached, len(seq.ids)), []).append((req, i, seq))
        failed = set()
        for (start, T), rows in groups.items():
            try:
                self._forward_prefill_group(start, T, rows)
            except OmniLMError:
                failed.update(req for req, _, _ in rows)
        for req in reqs:
            if req in failed:
                for seq in req.seqs:
                    seq.cached, seq.embeds = 0, None
                self._prefill(req, sum(len(seq.ids) for seq in req.seqs))
            elif req in self.prefilling:
                self._start(req)

    def _forward_prefill_group(self, start: int, T: int, rows):
        """Positions start..T of every row (start > 0: a cached prefix, whose keys are read from
        its pages; prefix caching is off for requests with media, so such rows have none)."""
        dev = self.device
        ids = torch.tensor([seq.ids for _, _, seq in rows], device=dev)  # (B, T)
        media = {}
        for key in BATCHED_MEDIA:
            parts = [req.media[key] for req, i, _ in rows if i == 0 and key in req.media]
            if parts:
                media[key] = torch.cat(parts)
        embeds = self.model.embed(ids, **media)[:, start:]  # (B, T - start, D)
        write = torch.tensor(
            [t for _, _, seq in rows for t in self.kv.slots(seq.pages, start, T)], device=dev
        )
        only = "image" if all(req.only == "image" for req, _, _ in rows) else None
        positions = torch.arange(start, T, device=dev)
        mask = None  # from 0: plain causal attention; after a prefix, the queries see it all (as _prefill)
        if start > 0:
            mask = (torch.arange(T, device=dev)[None, :] <= positions[:, None])[None, None]
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions[None].expand(len(rows), -1),
            cache=self.kv.view(write, self._read_pages([seq for _, _, seq in rows], T), T),
            cache_position=positions,
            kv_len=T,
            logits_slice=slice(-1, None),
            **({"logits_modality": only} if only else {}),
            **({"request_states": [None] * len(rows)} if self.stateful else {}),
        )
        disc = self.model.config.discrete
        for b, (req, _, seq) in enumerate(rows):
            logits = out.logits[b : b + 1, -1]  # (1, V)
            if req.only == "image" and only is None:
                logits = logits[:, disc.image_offset : disc.audio_offset]
            seq.cached, seq.last_logits = T, logits

    def _start(self, req: Request):
        """Every sequence of req is prefilled: sample its first token and let it decode."""
        if self.prefix_caching and not req.media and len(req.seqs) == 1:
            seq, P = req.seqs[0], self.page_size
            for page, h in zip(seq.pages, prefix_hashes(seq.ids, P, len(seq.ids) // P)):
                self.pool.register(page, h)
        self.prefilling.remove(req)
        self.running.append(req)
        self._sample(req, [seq.last_logits for seq in req.seqs])
        for seq in req.seqs:
            del seq.last_logits

    def _decode(self):
        """One batched forward: every running sequence feeds its last token."""
        reqs = list(self.running)
        seqs = [seq for req in reqs for seq in req.seqs]
        S = max(seq.cached for seq in seqs) + 1
        if self.lanes is not None:  # rows in lane order (the lanes keep each row's keys gathered)
            seqs = list(self.lanes.arrange(seqs, S))
        lengths = [seq.cached + 1 for seq in seqs]
        last = {id(seq): req.output[-1] for req in reqs for seq in req.seqs}
        tokens = torch.tensor([[last[id(s)]] for s in seqs], device=self.device)
        write = torch.tensor([s.pages[s.cached // self.page_size] * self.page_size + s.cached % self.page_size
                              for s in seqs], device=self.device)  # fmt: skip
        positions = torch.tensor([[s.cached] for s in seqs], device=self.device)  # (B, 1)
        mask = None
        if min(lengths) != S:  # rows of different lengths: each attends to its own keys only
            mask = (
                torch.arange(S, device=self.device)[None, :]
                < torch.tensor(lengths, device=self.device)[:, None]
            )
            mask = mask[:, None, None, :]  # (B, 1, 1, S)
        only = "image" if all(req.only == "image" for req in reqs) else None
        states = [seq.state for seq in seqs] if self.stateful else None
        if self.lanes is not None:
            cache = self.lanes.view(write, positions[:, 0], S)
            logits = self._forward_cache(tokens, mask, positions, cache, S, only, states)
        else:
            read = self._read_pages(seqs, S)  # (B, n_pages)
            logits = self._decode_forward(tokens, mask, positions, write, read, S, only, states)
        # logits (B, V) or (B, V_image), row i for seqs[i]
        row_of = {id(seq): i for i, seq in enumerate(seqs)}
        chosen = self._greedy_rows(reqs, logits, row_of, only)
        for req in reqs:
            for seq in req.seqs:
                seq.ids.append(req.output[-1])
                seq.cached += 1
            if req.id in chosen:
                self._take(req, Event(chosen[req.id]))
                continue
            rows = [logits[row_of[id(seq)]][None] for seq in req.seqs]
            if req.only == "image" and only is None:  # full logits computed for the batch: take its head
                disc = self.model.config.discrete
                rows = [r[:, disc.image_offset : disc.audio_offset] for r in rows]
            self._sample(req, rows)

    def _forward(self, tokens, mask, positions, write, read, S, only, states=None):
        """The decode step's model call: tokens, positions (B, 1); mask (B, 1, 1, S) or None."""
        return self._forward_cache(tokens, mask, positions, self.kv.view(write, read, S), S, only, states)

    def _forward_cache(self, tokens, mask, positions, cache, S, only, states=None):
        out = self.model(
            tokens,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            cache_position=positions[0],
            kv_len=S,
            **({"logits_modality": only} if only else {}),
            **({"request_states": states} if states is not None else {}),
        )
        return out.logits[:, -1]

    def _read_pages(self, seqs, S: int) -> torch.Tensor:
        """(B, n_pages) the pages holding each row's first S slots, row-padded with its first page."""
        n = math.ceil(S / self.page_size)
        return torch.tensor(
            [s.pages[:n] + [s.pages[0]] * (n - len(s.pages[:n])) for s in seqs], device=self.device
        )

    def _sample(self, req: Request, rows: list[torch.Tensor]):
        """Choose req's next token from its logits rows (cond first, then uncond), emit it, retire req
        if it is done."""
        cfg, disc = req.config, self.model.config.discrete
        logits = rows[0]
        if disc is not None:
            logits = logits.float()
            if cfg.guided:
                guided = guide(logits, rows[1].float(), cfg.guidance_scale)
                logits = guided if req.only or req.spans.in_image else logits
        elif cfg.guided:
            logits = guide(logits.float(), rows[1].float(), cfg.guidance_scale)
        raw = logits
        offset = 0
        if req.only:
            offset = disc.image_offset
        for p in req.processors:
            logits = p.process(logits, offset) if isinstance(p, Penalties) else p.process(logits)
        if req.spans is not None and not req.only:
            logits = req.spans.process(logits)
        token = (
            int(sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, cfg.min_p, req.generator)[0]) + offset
        )
        ev = Event(token)
        if cfg.logprobs is not None:
            lp = raw.float().log_softmax(-1)[0]  # (V,) the model's distribution, before any rule
            ev.logprob = float(lp[token - offset])
            if cfg.logprobs:
                top = lp.topk(min(cfg.logprobs, lp.shape[0]))
                ev.top_logprobs = [(int(i) + offset, float(v)) for v, i in zip(top.values, top.indices)]
        if req.processors:
            t = torch.tensor([token], device=self.device)
            for p in req.processors:
                p.update(t)
        self._take(req, ev)

    def _greedy_rows(self, reqs, logits, row_of, only) -> dict[int, int]:
        """{request id: token} for the plain greedy requests of a decode step (no processors, no
        guidance, no logprobs), chosen by one argmax over their rows: exactly the token _sample
        picks row by row (the same span mask, the same argmax of each row)."""
        plain = [
            r for r in reqs
            if (r.config.temperature <= 0.0 or r.config.top_k == 1) and not r.processors
            and not r.config.guided and r.config.logprobs is None and not (r.only and only is None)
        ]  # fmt: skip
        if len(plain) < 2:
            return {}
        x = logits.index_select(0, torch.tensor([row_of[id(r.seqs[0])] for r in plain], device=logits.device))
        disc = self.model.config.discrete
        offsets = [0] * len(plain)
        if disc is not None:
            x = x.float()
            masked = [i for i, r in enumerate(plain) if r.spans is not None and not r.only]
            allowed = plain[masked[0]].spans.allowed if masked else None
            if any(plain[i].spans.allowed is not allowed for i in masked):
                return {}
            if masked:
                idx = torch.tensor(masked, device=x.device)
                states = torch.tensor([plain[i].spans.state for i in masked], device=x.device)
                x[idx] = x[idx].masked_fill(~allowed[states], float("-inf"))
            offsets = [disc.image_offset if r.only else 0 for r in plain]
        tokens = x.argmax(-1).tolist()
        return {r.id: t + o for r, t, o in zip(plain, tokens, offsets, strict=True)}

    def _take(self, req: Request, ev: Event):
        """Record req's sampled token (ev.token), emit it, retire req if it is done."""
        token = ev.token
        if req.spans is not None:
            req.spans.update(token)
        req.output.append(token)
        if token in req.eos:
            ev.finish_reason = "stop"
        elif len(req.output) >= req.max_new:
            ev.finish_reason = "length"
        if ev.finish_reason:
            self._finish(req, ev)
        else:
            req._emit(ev)
            if req.cancel_reason:  # on_event asked to stop (a stop string): its pages go now
                self._finish(req, Event(None, finish_reason=req.cancel_reason))

    def _finish(self, req: Request, ev: Event):
        for lst in (self.prefilling, self.running):
            if req in lst:
                lst.remove(req)
        for seq in req.seqs:
            seq.state = seq.embeds = None
            if seq.pages:
                self.pool.release(seq.pages)
                seq.pages = []
        req._emit(ev)
