"""The OpenAI-compatible HTTP app: routes, errors, key, body cap, backpressure, metrics.

    app = create_app(lambda: Backend.load("demo"), api_key="k")   # uvicorn.run(app) or TestClient(app)

Every failure is answered in the OpenAI error shape {"error": {"message", "type", "param", "code"}}:
user errors (bad JSON, a field out of range, an unknown field, media that does not decode, a prompt
over the context) 400, a body over the cap 413, a full queue 429 with Retry-After, no key 401.
The model loads in a thread after the socket is open: /health says 503 until it is ready.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import random
import threading
import time
import weakref

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import ContextLengthError, OmniLMError, QueueFullError
from . import schemas
from .media import MediaPolicy, to_parts

# torch (and so the backend and the text streamer) is imported by the loading thread, not here: the
# socket opens, and /health answers 503, before the ~2 s import of torch is done.

DEFAULT_MAX_BODY = 64 * 1024 * 1024
DEFAULT_MAX_TOKENS = 64
INLINE_TEXT = 16_384  # chat text (characters) rendered on the event loop; more, or any media part: a worker
OPEN_ROUTES = frozenset({"/health"})  # the only route answered without the key


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message, type_="invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(e: APIError, headers=None) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=headers)


# ---- metrics ---------------------------------------------------------------------------------------


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("omnilm_requests", "HTTP requests", ["route", "status"], registry=r)
        self.queue = Gauge("omnilm_queue_length", "requests waiting for the model", registry=r)
        self.running = Gauge("omnilm_running", "requests being generated", registry=r)
        self.pages = Gauge("omnilm_kv_page_use", "fraction of KV cache pages in use", registry=r)
        self.tokens_in = Counter("omnilm_prompt_tokens", "prompt tokens", registry=r)
        self.tokens_out = Counter("omnilm_completion_tokens", "completion tokens", registry=r)
        self.latency = Histogram("omnilm_request_seconds", "request latency", ["route"], registry=r)
        self.ttft = Histogram("omnilm_time_to_first_token_seconds", "time to first token", registry=r)

    def render(self, backend) -> bytes:
        from prometheus_client import generate_latest

        if backend is not None:
            queued, running, pages = backend.stats()
            self.queue.set(queued)
            self.running.set(running)
            self.pages.set(pages)
        return generate_latest(self.registry)


# ---- middleware: body cap and key (pure ASGI, so streams pass through untouched) --------------------


class Guard:
    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:  # counted when the response ends (a stream: its last chunk)
            route = scope.get("route")
            name = route.path if route is not None else "unrouted"
            self.state.metrics.requests.labels(name, str(status[0])).inc()
            self.state.metrics.latency.labels(name).observe(time.monotonic() - t0)

    async def _guarded(self, scope, receive, send):
        path = scope["path"]
        key = self.state.api_key
        if key and path not in OPEN_ROUTES and not _key_ok(scope, key):
            if path == "/" and scope["method"] == "GET":
                from .page import KEY_FORM

                return await HTMLResponse(KEY_FORM, status_code=401)(scope, receive, send)
            body = error_body("missing or wrong API key (Authorization: Bearer KEY)", "authentication_error",
                              code="invalid_api_key")  # fmt: skip
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        cap = self.state.max_body
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cap):
            return await _too_large(cap)(scope, receive, send)
        # Read the body here, counting, so a chunked upload cannot pass the cap either.
        chunks, size = [], 0
        if scope["method"] in ("POST", "PUT", "PATCH"):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return
                size += len(msg.get("body", b""))
                if size > cap:
                    return await _too_large(cap)(scope, receive, send)
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed and scope["method"] in ("POST", "PUT", "PATCH"):
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(cap):
    return JSONResponse(error_body(f"request body over the limit of {cap} bytes", code="body_too_large"), 413)


def _key_ok(scope, key: str) -> bool:
    headers = dict(scope["headers"])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    given = (
        auth[7:] if auth.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode("latin-1")
    )
    if not given and scope["path"] == "/" and scope.get("query_string"):
        from urllib.parse import parse_qs

        given = parse_qs(scope["query_string"].decode("latin-1")).get("key", [""])[0]
    return hmac.compare_digest(given.encode(), key.encode())


# ---- the app ---------------------------------------------------------------------------------------


class State:
    def __init__(self, load, api_key, max_body, policy, model_name):
        self.load, self.api_key, self.max_body, self.policy = load, api_key, max_body, policy
        self.model_name = model_name
        self.backend = None
        self.load_error = None
        self.metrics = Metrics()
        self.started = time.time()
        self._loading = None

    def start_loading(self):
        if self._loading is None:
            self._loading = threading.Thread(target=self._load, name="omnilm-load", daemon=True)
            self._loading.start()

    def _load(self):
        try:
            self.backend = self.load() if callable(self.load) else self.load
        except Exception as e:  # reported by /health and every route
            self.load_error = f"{type(e).__name__}: {e}"


def create_app(load, api_key=None, max_body: int = DEFAULT_MAX_BODY, allow_media_url=False,
               allow_local_media=None, model_name: str = "omnilm", load_on_startup: bool = True) -> FastAPI:  # fmt: skip
    """load: a callable returning a Backend (run in a thread), or a Backend. load_on_startup=False:
    the caller starts loading with `app.state.omnilm.start_loading()` (omnilm serve does, once the
    socket listens, so the ~2 s torch import does not hold up the first /health answer)."""
    from contextlib import asynccontextmanager

    policy = MediaPolicy(allow_media_url, allow_local_media)
    state = State(load, api_key, max_body, policy, model_name)

    @asynccontextmanager
    async def lifespan(app):
        if load_on_startup:
            state.start_loading()
        yield
        if state.backend is not None:
            await run_in_threadpool(state.backend.stop)

    app = FastAPI(title="OmniLM", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.omnilm = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return _error_response(e, {"Retry-After": "1"} if e.status == 429 else None)

    @app.exception_handler(Exception)
    async def _internal(request, e):
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

    def backend():
        if state.load_error:
            raise APIError(503, f"the model failed to load: {state.load_error}", "server_error")
        if state.backend is None:
            raise APIError(503, "the model is loading", "server_error", code="loading")
        if not getattr(state.backend, "alive", True):
            raise APIError(503, f"the engine stopped: {state.backend.alive_error}", "server_error")
        return state.backend

    @app.get("/health")
    async def health():
        if state.backend is None:
            msg = f"failed: {state.load_error}" if state.load_error else "loading"
            return JSONResponse({"status": msg}, status_code=503)
        if not getattr(state.backend, "alive", True):  # the engine process died: restart the server
            return JSONResponse({"status": f"failed: {state.backend.alive_error}"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        backend()
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        backend()
        if name != state.model_name:
            raise APIError(404, f"model {name!r} not found; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        return _model_card(state)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(state.metrics.render(state.backend), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        from .page import PAGE

        return HTMLResponse(PAGE)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _parse(request, schemas.ChatRequest)
        b = backend()
        _check_model(state, body.model)
        if body.modalities and "audio" in body.modalities and not _has_audio_head(b):
            raise APIError(400, "this model does not generate audio", param="modalities")
        try:
            from ..pipeline import prompt_of, render_messages  # torch: imported once the model has loaded

            def encode():
                return prompt_of(render_messages(b.processor, to_parts(body.messages, state.policy)))

            # base64 and media decoding are CPU work: off the event loop, in a worker thread; short text
            # renders in a fraction of a millisecond, less than the two hops there and back
            chars = sum(len(m.content) if isinstance(m.content, str) else INLINE_TEXT for m in body.messages)
            encoded = encode() if chars < INLINE_TEXT else await run_in_threadpool(encode)
        except OmniLMError as e:
            raise _user_error(e) from None
        prompt, media = encoded.ids, encoded.media
        top = (body.top_logprobs or 0) if body.logprobs else None
        cfg = _config(b, body, len(prompt), body.max_completion_tokens or body.max_tokens, top)
        if body.stream:
            return await _stream_chat(request, state, b, body, prompt, media, cfg)
        choices = await _run_choices(request, state, b, prompt, media, cfg, body.n)
        out_choices = []
        for i, c in enumerate(choices):
            message = {"role": "assistant", "content": c["text"]}
            if body.modalities and "audio" in body.modalities:
                message["audio"] = await run_in_threadpool(_audio_out, b, c["ids"], c["text"])
            out = {"index": i, "message": message, "finish_reason": c["finish"], "logprobs": None}
            if body.logprobs:
                out["logprobs"] = {"content": [_chat_logprob(b, e) for e in c["events"]]}
            out_choices.append(out)
        return {
            "id": _new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": out_choices,
            "usage": _usage(len(prompt), choices),
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, schemas.CompletionRequest)
        b = backend()
        _check_model(state, body.model)
        if body.stream and body.echo:
            raise APIError(400, "echo is not supported with stream", param="echo")
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        try:
            encoded = [
                b.processor.encode_prompt(p) if isinstance(p, str) else _checked_ids(b, p) for p in prompts
            ]
        except OmniLMError as e:
            raise _user_error(e) from None
        if body.stream and len(prompts) > 1:
            raise APIError(400, "stream takes one prompt", param="prompt")
        out_choices, usage_choices, n_prompt = [], [], 0
        for prompt in encoded:
            n_prompt += len(prompt)
            want = body.max_tokens if body.max_tokens is not None else 16
            cfg = _config(b, body, len(prompt), want, body.logprobs, allow_zero=body.echo)
            if body.stream:
                return await _stream_completion(request, state, b, body, prompt, cfg)
            choices = []
            if cfg.max_new_tokens > 0:
                choices = await _run_choices(request, state, b, prompt, {}, cfg, body.n)
            else:
                choices = [{"text": "", "ids": [], "events": [], "finish": "length"}] * body.n
            echo_scores = None
            if body.echo and body.logprobs is not None:
                echo_scores = await run_in_threadpool(b.score, prompt, None, body.logprobs)
            for c in choices:
                text = c["text"]
                logprobs = None
                if body.logprobs is not None:
                    logprobs = _completion_logprobs(b, prompt if body.echo else [], echo_scores, c["events"])
                if body.echo:
                    text = b.processor.tokenizer.decode(prompt) + text
                out_choices.append({"index": len(out_choices), "text": text, "logprobs": logprobs,
                                    "finish_reason": c["finish"]})  # fmt: skip
                usage_choices.append(c)
        usage = _usage(n_prompt, usage_choices)
        return {"id": _new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": state.model_name, "choices": out_choices, "usage": usage}  # fmt: skip

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await _parse(request, schemas.ImageRequest)
        b = backend()
        _check_model(state, body.model)
        disc = getattr(b.model.config, "discrete", None)
        if disc is None or not disc.image_vocab_size:
            raise APIError(400, "this model does not generate images (it has no discrete image head)")
        from ..generation.config import GenerationConfig

        tok = b.processor.tokenizer
        prompt = tok.encode(body.prompt, add_bos=True)
        cfg = GenerationConfig(max_new_tokens=disc.tokens_per_image + 2, seed=body.seed,
                               guidance_scale=body.guidance_scale)  # fmt: skip
        if len(prompt) + cfg.max_new_tokens > b.context:
            raise APIError(400, f"the prompt is too long for this model's context of {b.context} tokens",
                           param="prompt", code="context_length_exceeded")  # fmt: skip
        cfg.temperature = 0.0 if body.n == 1 else 1.0
        choices = await _run_choices(request, state, b, prompt, {}, cfg, body.n)
        data = []
        for c in choices:
            pngs = await run_in_threadpool(_images_out, b, prompt + c["ids"])
            if not pngs:
                raise APIError(400, "the model did not draw an image for this prompt (try 'draw a 7')",
                               param="prompt", code="no_image")  # fmt: skip
            data.append({"b64_json": pngs[0], "revised_prompt": body.prompt})
        return {"created": int(time.time()), "data": data}

    return app


# ---- helpers ---------------------------------------------------------------------------------------


def _model_card(state) -> dict:
    return {"id": state.model_name, "object": "model", "created": int(state.started), "owned_by": "omnilm"}


def _check_model(state, name):
    if name is not None and name != state.model_name:
        raise APIError(404, f"model {name!r} not found; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")  # fmt: skip


async def _parse(request: Request, schema):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"] if not (isinstance(x, str) and x.endswith("Part")))
        if err["type"] == "extra_forbidden":
            raise APIError(
                400, f"unsupported parameter: {param}", param=param, code="unsupported_parameter"
            ) from None
        raise APIError(400, f"{param}: {err['msg']}", param=param or None, code="invalid_value") from None


def _user_error(e: OmniLMError) -> APIError:
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), "rate_limit_error", code="queue_full")
    return APIError(400, " ".join(str(e).split()), code=code)


def _generation_error(ev) -> APIError:
    """A request the engine failed: the user's fault (bad media, shapes) is 400, anything else 500."""
    if isinstance(ev.error, OmniLMError):
        return _user_error(ev.error)
    return APIError(500, f"generation failed: {type(ev.error).__name__}", "server_error")


def _checked_ids(b, ids: list[int]) -> list[int]:
    """Token ids given by a client: inside the vocabulary, and never a media placeholder (no media here)."""
    vocab = b.processor.tokenizer.vocab_size
    placeholders = {b.processor.image_token_id, b.processor.audio_token_id} - {None}
    for i, t in enumerate(ids):
        if t >= vocab or t in placeholders:
            raise APIError(400, f"prompt token {i} ({t}) is not a text token id of this model (vocabulary {vocab})",
                           param="prompt")  # fmt: skip
    return list(ids)


def _config(b, body, n_prompt: int, max_tokens, logprobs, allow_zero=False):
    room = b.context - n_prompt
    if room <= 0 or (not allow_zero and room < 1):
        raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context is {b.context}",
                       param="messages", code="context_length_exceeded")  # fmt: skip
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    if max_tokens > room:
        raise APIError(400, f"max_tokens {max_tokens} plus the prompt's {n_prompt} tokens exceed this "
                       f"model's context of {b.context}", param="max_tokens", code="context_length_exceeded")  # fmt: skip
    if max_tokens == 0 and not allow_zero:
        raise APIError(400, "max_tokens must be at least 1", param="max_tokens")
    from ..generation.config import GenerationConfig

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens,
            temperature=body.temperature if body.temperature is not None else 0.0,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            seed=body.seed,
            stop_strings=tuple(stop),
            logprobs=logprobs,
        )
    except OmniLMError as e:
        raise _user_error(e) from None


class _Handoff:
    """Engine events to the event loop: the engine thread appends (sink, event) pairs and wakes the
    loop once for all the events of a step, not once per token per request (each wake-up is a write
    to the loop's self-pipe and a callback, which at 16 streams cost more than the step's tokens)."""

    def __init__(self, loop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def put(self, sink, ev):
        with self.lock:
            self.pending.append((sink, ev))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self):
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for sink, ev in items:
            sink.put_nowait(ev)


_handoffs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop
_id_source = random.Random()  # seeded from os.urandom once: uuid4 reads it (a syscall) for every id


def _new_id(prefix: str) -> str:
    """A response id (chatcmpl-<32 hex>); unique, not secret. On the event loop a syscall hands the
    GIL to the engine thread and waits to get it back."""
    return f"{prefix}-{_id_source.getrandbits(128):032x}"


def _submit(b, prompt, media, cfg, loop, sink):
    handoff = _handoffs.get(loop)
    if handoff is None:
        handoff = _handoffs[loop] = _Handoff(loop)
    try:
        return b.submit(prompt, cfg, media, on_event=lambda ev: handoff.put(sink, ev))
    except OmniLMError as e:
        raise _user_error(e) from None


async def _events(request: Request, req, sink: asyncio.Queue, state, t0, poll_disconnect: bool = True):
    """Events of one engine request; the request is cancelled if the client goes away.

    A whole answer (poll_disconnect) asks the connection twice a second; a stream need not:
    StreamingResponse listens for the disconnect itself and closes this generator, so it waits for
    its next event with a plain await (asyncio.wait_for would make a task and a timer per token)."""
    first, checked = True, time.monotonic()
    try:
        while True:
            try:
                ev = sink.get_nowait()  # the common case under load: no waiting task to create
            except asyncio.QueueEmpty:
                if not poll_disconnect:  # plain await: wait_for makes a task and a timer per token
                    ev = await sink.get()
                else:
                    try:
                        ev = await asyncio.wait_for(sink.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        ev = None
            if poll_disconnect and time.monotonic() - checked >= 0.5:  # also while tokens flow
                checked = time.monotonic()
                if await request.is_disconnected():
                    return
            if ev is None:
                continue
            if first and ev.token is not None:
                state.metrics.ttft.observe(time.monotonic() - t0)
                first = False
            yield ev
            if ev.finish_reason is not None:
                return
    finally:
        req.cancel()  # a no-op once finished; frees the slot when the client left or a stop string hit


async def _choice(request, state, b, req, sink, cfg) -> dict:
    """Collect one choice: its text (cut at a stop string), ids, events with logprobs, finish reason."""
    from ..generation.text import TextStream

    text = TextStream(b.processor.tokenizer, cfg.stop_strings)
    ids, events, finish = [], [], "length"
    async for ev in _events(request, req, sink, state, time.monotonic()):
        if ev.finish_reason == "error":
            raise _generation_error(ev)
        if ev.token is not None and ev.token not in b.eos_ids:  # the end token is not part of the answer
            text.push(ev.token)
            ids.append(ev.token)
            events.append(ev)
            if text.stopped:
                finish = "stop"
                break
        if ev.finish_reason is not None:
            finish = "length" if ev.finish_reason == "length" else "stop"
    text.finish()
    state.metrics.tokens_out.inc(len(ids))
    return {"text": text.text, "ids": ids, "events": events, "finish": finish}


def _submit_choices(state, b, prompt, media, cfg, n) -> list[tuple]:
    """n engine requests for one prompt ((request, its event queue) each; choice i samples with seed + i),
    all or none: a refused one cancels those already in."""
    loop = asyncio.get_running_loop()
    reqs = []
    try:
        for i in range(n):
            c = cfg if cfg.seed is None or i == 0 else _with_seed(cfg, cfg.seed + i)
            sink = asyncio.Queue()
            reqs.append((_submit(b, prompt, media, c, loop, sink), sink))
    except APIError:
        for r, _ in reqs:
            r.cancel()
        raise
    state.metrics.tokens_in.inc(len(prompt))
    return reqs


async def _run_choices(request, state, b, prompt, media, cfg, n) -> list[dict]:
    reqs = _submit_choices(state, b, prompt, media, cfg, n)
    return list(await asyncio.gather(*(_choice(request, state, b, r, s, cfg) for r, s in reqs)))


def _with_seed(cfg, seed):
    from dataclasses import replace

    return replace(cfg, seed=seed)


def _usage(n_prompt, choices) -> dict:
    done = sum(len(c["ids"]) for c in choices)
    return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}


def _token_str(b, tok_id) -> str:
    return b.processor.tokenizer.decode([tok_id], skip_special=False)


def _chat_logprob(b, ev) -> dict:
    def entry(tok_id, lp):
        s = _token_str(b, tok_id)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    # logprobs without top_logprobs: the engine gives no alternatives (None), OpenAI an empty list
    return {**entry(ev.token, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top_logprobs or ()]}


def _completion_logprobs(b, prompt, echo_scores, events) -> dict:
    tokens, lps, tops, offsets, pos = [], [], [], [], 0
    pairs = []
    if prompt:
        pairs.append((prompt[0], None, None))
        pairs += [(t, lp, top) for t, (lp, top) in zip(prompt[1:], echo_scores)]
    pairs += [(e.token, e.logprob, e.top_logprobs) for e in events]
    for tok_id, lp, top in pairs:
        s = _token_str(b, tok_id)
        tokens.append(s)
        lps.append(lp)
        tops.append(None if top is None else {_token_str(b, t): v for t, v in top})
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _has_audio_head(b) -> bool:
    disc = getattr(b.model.config, "discrete", None)
    return disc is not None and bool(disc.audio_vocab_size)


def _images_out(b, ids) -> list[str]:
    images, _ = b.decode_media(ids)
    out = []
    for im in images:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def _audio_out(b, ids, transcript) -> dict | None:
    import soundfile

    _, waves = b.decode_media(ids)
    if not waves:
        return None
    buf = io.BytesIO()
    soundfile.write(buf, waves[0][0], waves[0][1], format="WAV")
    return {"id": _new_id("audio"), "data": base64.b64encode(buf.getvalue()).decode(),
            "expires_at": int(time.time()) + 3600, "transcript": transcript}  # fmt: skip


# ---- streaming -------------------------------------------------------------------------------------


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream_chat(request, state, b, body, prompt, media, cfg):
    return await _stream(request, state, b, body, prompt, media, cfg, chat=True)


async def _stream_completion(request, state, b, body, prompt, cfg):
    return await _stream(request, state, b, body, prompt, {}, cfg, chat=False)


async def _stream(request, state, b, body, prompt, media, cfg, chat: bool):
    """SSE as the OpenAI client reads it: role chunk, content chunks, finish chunk, [usage], [DONE]."""
    reqs = _submit_choices(state, b, prompt, media, cfg, body.n)
    ident = _new_id("chatcmpl" if chat else "cmpl")
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    # A content chunk is the same JSON but for its text: written once as a template, so each token
    # costs one json.dumps of a string instead of the whole nested object.
    head = json.dumps({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                       "created": created, "model": state.model_name}, ensure_ascii=False)[:-1]  # fmt: skip
    content_key = '"delta": {"content": ' if chat else '"text": '
    content_end = "}" if chat else ""

    def content_chunk(index, piece) -> str:
        return (f'data: {head}, "choices": [{{"index": {index}, {content_key}{json.dumps(piece, ensure_ascii=False)}'
                f'{content_end}, "finish_reason": null, "logprobs": null}}]}}\n\n')  # fmt: skip

    def chunk(index, delta=None, finish=None, text=None, logprobs=None):
        if chat:
            choice = {"index": index, "delta": delta or {}, "finish_reason": finish, "logprobs": logprobs}
            return {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": state.model_name, "choices": [choice]}  # fmt: skip
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        return {"id": ident, "object": "text_completion", "created": created, "model": state.model_name,
                "choices": [choice]}  # fmt: skip

    async def choice(index, req, sink):
        """One choice's chunks, then ("done", completion tokens)."""
        from ..generation.text import TextStream

        text = TextStream(b.processor.tokenizer, cfg.stop_strings)
        finish, count, piece, lps = "length", 0, "", []

        def flush():
            nonlocal piece, lps
            item = None
            if piece and not lps:
                item = content_chunk(index, piece)
            elif piece or lps:
                lp = {"content": lps} if lps else None
                item = chunk(index, {"content": piece}, text=piece, logprobs=lp)
            piece, lps = "", []
            return item

        if chat:
            yield chunk(index, {"role": "assistant", "content": ""})
        try:
            async for ev in _events(request, req, sink, state, time.monotonic(), poll_disconnect=False):
                if ev.finish_reason == "error":
                    finish = "error"
                    break
                if ev.token is not None and ev.token not in b.eos_ids:
                    count += 1
                    piece += text.push(ev.token)
                    if chat and cfg.logprobs is not None:
                        lps.append(_chat_logprob(b, ev))
                    if text.stopped:
                        finish = "stop"
                        break
                if ev.finish_reason is not None:
                    finish = "length" if ev.finish_reason == "length" else "stop"
                elif sink.qsize() == 0 and (item := flush()):  # waiting tokens go out in one chunk
                    yield item
            if not text.stopped:
                piece += text.finish()
            if item := flush():
                yield item
            yield chunk(index, {}, finish=finish)
        finally:
            state.metrics.tokens_out.inc(count)
        yield ("done", count)

    async def one(index, req, sink, out: asyncio.Queue):
        finished = False
        try:
            async for item in choice(index, req, sink):
                finished = finished or isinstance(item, tuple)
                await out.put(item)
        finally:  # the merge below counts one "done" per choice, whatever happened
            if not finished:
                await out.put(("done", 0))

    async def merged():
        """Every choice's chunks, merged as they come (n > 1; one choice streams directly)."""
        out: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(one(i, r, s, out)) for i, (r, s) in enumerate(reqs)]
        try:
            done = 0
            while done < len(tasks):
                item = await out.get()
                done += isinstance(item, tuple)
                yield item
        finally:
            for t in tasks:
                t.cancel()

    async def events():
        completion = 0
        try:
            async for item in choice(0, *reqs[0]) if len(reqs) == 1 else merged():
                if isinstance(item, tuple):
                    completion += item[1]
                    continue
                yield item if isinstance(item, str) else _sse(item)
            if include_usage:
                usage = {"prompt_tokens": len(prompt), "completion_tokens": completion,
                         "total_tokens": len(prompt) + completion}  # fmt: skip
                yield _sse({"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": state.model_name, "choices": [], "usage": usage})  # fmt: skip
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): stop every choice at once
            for r, _ in reqs:
                r.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
