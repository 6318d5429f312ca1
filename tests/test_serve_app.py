"""The HTTP app in-process: the key on every route, validation in the OpenAI error shape, the body
cap, backpressure, cancellation on disconnect, and a hypothesis fuzz of the request schemas."""

import base64
import io
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from omnilm.errors import QueueFullError
from omnilm.generation import Event
from omnilm.serve.app import OPEN_ROUTES, create_app

KEY = "k-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class SlowRequest:
    def __init__(self, backend, n_tokens, delay, on_event):
        self.cancelled = threading.Event()
        self.backend = backend
        self.thread = threading.Thread(target=self._run, args=(n_tokens, delay, on_event), daemon=True)
        self.thread.start()

    def _run(self, n_tokens, delay, on_event):
        digit = self.backend.processor.tokenizer.encode("1")[0]
        try:
            for _ in range(n_tokens):
                if self.cancelled.is_set():
                    break
                time.sleep(delay)
                on_event(Event(token=digit))
            on_event(Event(None, finish_reason="length"))
        finally:
            self.backend.active -= 1

    def cancel(self):
        self.cancelled.set()
        self.backend.cancels += 1


class FakeBackend:
    """The Backend interface with a real processor and a clock instead of a model."""

    def __init__(self, max_queue=2, n_tokens=5, delay=0.0):
        import omnilm

        self.processor = omnilm.load_processor("demo")
        self.model = SimpleNamespace(config=SimpleNamespace(discrete=None))
        self.context, self.max_queue, self.n_tokens, self.delay = 128, max_queue, n_tokens, delay
        self.active, self.cancels, self.queued, self.running, self.page_use = 0, 0, 0, 0, 0.0
        self.eos_ids = frozenset({2})
        self.lock = threading.Lock()

    def stats(self):
        return self.queued, self.running, self.page_use

    def submit(self, prompt_ids, cfg, media=None, on_event=None):
        with self.lock:
            if self.active >= self.max_queue:
                raise QueueFullError(f"the server queue is full ({self.max_queue} waiting)")
            self.active += 1
        return SlowRequest(self, min(self.n_tokens, cfg.max_new_tokens), self.delay, on_event)

    def stop(self):
        pass


def _ready(client):
    deadline = time.time() + 30
    while client.get("/health").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.02)


@pytest.fixture
def fake_client():
    with TestClient(create_app(FakeBackend(), api_key=KEY, max_body=4096)) as c:
        _ready(c)
        yield c


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_every_route_but_health_needs_the_key(fake_client):
    routes = [r for r in fake_client.app.routes if hasattr(r, "methods")]
    assert len(routes) >= 8
    for route in routes:
        path = route.path.replace("{name}", "demo")
        for method in route.methods - {"HEAD"}:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                r = fake_client.request(method, path, headers=headers)
                if route.path in OPEN_ROUTES:
                    assert r.status_code == 200, path
                else:
                    assert r.status_code == 401, (method, path, headers)
    assert OPEN_ROUTES == {"/health"}
    assert fake_client.get("/v1/models", headers=AUTH).status_code == 200
    assert fake_client.get("/", params={"key": KEY}).status_code == 200  # the page takes ?key= once


def test_validation_errors_name_the_field(fake_client):
    post = lambda body, **kw: fake_client.post("/v1/chat/completions", headers=AUTH, json=body, **kw)  # noqa: E731
    msg = [{"role": "user", "content": "hi"}]
    assert _error(post({"messages": msg, "logit_bias": {"1": 2}}), 400)["param"] == "logit_bias"
    assert _error(post({"messages": msg, "temperature": "hot"}), 400)["param"] == "temperature"
    assert _error(post({"messages": msg, "max_tokens": -1}), 400)["param"] == "max_tokens"
    assert _error(post({"messages": msg, "n": 10**9}), 400)["param"] == "n"
    assert _error(post({"messages": []}), 400)["param"] == "messages"
    assert _error(post({"messages": [{"role": "user", "content": [{"type": "video"}]}]}), 400)["param"]
    assert _error(post({"messages": msg, "max_tokens": 500}), 400)["code"] == "context_length_exceeded"
    bad = [
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "@@", "format": "wav"}}]}
    ]
    assert "base64" in _error(post({"messages": bad}), 400)["message"]
    url = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}
    ]
    assert "allow-media-url" in _error(post({"messages": url}), 400)["message"]
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]
    assert "allow-local-media" in _error(post({"messages": local}), 400)["message"]
    r = fake_client.post(
        "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=b"{"
    )
    assert "JSON" in _error(r, 400)["message"]
    assert _error(post({"messages": msg, "model": "gpt-4"}), 404)["code"] == "model_not_found"
    ok = post({"messages": msg, "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "111"


def test_body_cap_is_413(fake_client):
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert (
        _error(fake_client.post("/v1/chat/completions", headers=AUTH, json=big), 413)["code"]
        == "body_too_large"
    )

    def chunks():
        for _ in range(10):
            yield b" " * 1000

    r = fake_client.post("/v1/chat/completions", headers=AUTH, content=chunks())  # no content-length
    _error(r, 413)


def _serve_in_thread(app):
    import socket

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.time() < deadline
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def test_backpressure_and_disconnect_on_a_real_socket():
    backend = FakeBackend(max_queue=4, n_tokens=60, delay=0.01)
    server, thread, base = _serve_in_thread(create_app(backend, api_key=KEY))
    try:
        # a client that leaves mid-stream: its request is cancelled at once
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 60}
        with httpx.stream("POST", base + "/v1/chat/completions", headers=AUTH, json=body) as r:
            next(r.iter_lines())
        deadline = time.time() + 3
        while backend.cancels == 0 or backend.active:
            assert time.time() < deadline, "the dropped stream was not cancelled"
            time.sleep(0.01)

        # twice the capacity at once: the excess gets fast 429s with Retry-After, nothing 5xx
        statuses, retry = [], []

        def one():
            r = httpx.post(
                base + "/v1/chat/completions", headers=AUTH, json={**body, "stream": False}, timeout=30
            )
            statuses.append(r.status_code)
            retry.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(set(statuses)) == [200, 429] and statuses.count(200) >= 4
        assert all(ra == "1" for s, ra in zip(statuses, retry) if s == 429)
        assert (
            httpx.post(
                base + "/v1/chat/completions", headers=AUTH, json={**body, "stream": False}
            ).status_code
            == 200
        )
        metrics = httpx.get(base + "/metrics", headers=AUTH).text
        assert 'omnilm_requests_total{route="/v1/chat/completions",status="429"}' in metrics
    finally:
        server.should_exit = True
        thread.join(10)


def test_page_is_self_contained_and_speaks_the_api(fake_client):
    html = fake_client.get("/", headers=AUTH).text
    assert "<script src" not in html and "http://" not in html and "https://" not in html  # no CDN
    for needle in ("/v1/chat/completions", "image_url", "input_audio", "video_url", "file_data", "stream: true",
                   "/v1/images/generations", 'aria-label="Conversation"', 'for="prompt"', "sessionStorage"):  # fmt: skip
        assert needle in html
    # the request the page sends for an attached PNG and a question is accepted as it is
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (16, 16), "white").save(png, format="PNG")
    part = {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()},
    }
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "which digit is this?"}]}],
            "stream": True, "temperature": 0, "max_tokens": 64}  # fmt: skip
    r = fake_client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")


# ---- fuzz ------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

_junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=20),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)  # fmt: skip
_b64 = st.one_of(st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=30))
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)}),
    st.fixed_dictionaries(
        {"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _b64.map(lambda s: "data:image/png;base64," + s)})}
    ),
    st.fixed_dictionaries(
        {"type": st.just("input_audio"), "input_audio": st.fixed_dictionaries({"data": _b64, "format": st.sampled_from(["wav", "mp3", "aac"])})}
    ),
    st.fixed_dictionaries({"type": st.just("file"), "file": st.fixed_dictionaries({"file_data": _b64, "filename": st.text(max_size=10)})}),
    st.fixed_dictionaries(
        {"type": st.just("video_url"), "video_url": st.fixed_dictionaries({"url": _b64.map(lambda s: "data:video/mp4;base64," + s)})}
    ),
    st.dictionaries(st.sampled_from(["type", "text", "image_url"]), _junk, max_size=2),
)  # fmt: skip
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", ""]),
     "content": st.one_of(st.text(max_size=60), st.lists(_part, max_size=3), _junk)}
)  # fmt: skip
_sampling = {
    "temperature": st.one_of(st.floats(-1, 3), _junk),
    "top_p": st.one_of(st.floats(-0.5, 1.5), _junk),
    "top_k": st.one_of(st.integers(-5, 5000), _junk),
    "max_tokens": st.one_of(st.integers(-2, 200), _junk),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=6), _junk),
    "seed": st.one_of(st.integers(-(2**64), 2**64), _junk),
    "n": st.one_of(st.integers(-1, 3), _junk),
    "stream": st.one_of(st.booleans(), _junk),
    "presence_penalty": st.one_of(st.floats(-3, 3), _junk),
    "repetition_penalty": st.one_of(st.floats(-1, 3), _junk),
    "bogus_field": _junk,
}
_settings = hypothesis.settings(max_examples=50, deadline=None, derandomize=True, database=None,
                                suppress_health_check=list(hypothesis.HealthCheck))  # fmt: skip


@pytest.fixture(scope="module")
def demo_client():
    from omnilm.serve.backend import Backend

    with TestClient(create_app(lambda: Backend.load("demo"), api_key=KEY, model_name="demo")) as c:
        _ready(c)
        yield c


def _no_5xx(client, path, body):
    # json.dumps writes NaN/Infinity (not JSON, but what a sloppy client sends)
    r = client.post(path, headers={**AUTH, "Content-Type": "application/json"}, content=json.dumps(body))
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@_settings
@hypothesis.given(messages=st.one_of(st.lists(_message, max_size=3), _junk),
                  extra=st.fixed_dictionaries({}, optional=_sampling | {"logprobs": _junk, "top_logprobs": _junk}))  # fmt: skip
def test_fuzz_chat(demo_client, messages, extra):
    _no_5xx(demo_client, "/v1/chat/completions", {"messages": messages, **extra})


@_settings
@hypothesis.given(prompt=st.one_of(st.text(max_size=80), st.lists(st.text(max_size=20), max_size=3), _junk),
                  extra=st.fixed_dictionaries({}, optional=_sampling | {"echo": _junk, "logprobs": st.one_of(st.integers(-1, 7), _junk)}))  # fmt: skip
def test_fuzz_completions(demo_client, prompt, extra):
    _no_5xx(demo_client, "/v1/completions", {"prompt": prompt, **extra})


@_settings
@hypothesis.given(body=st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=40), _junk)},
    optional={"n": st.one_of(st.integers(-1, 5), _junk), "size": _junk, "response_format": st.sampled_from(["url", "b64_json", 3]),
              "seed": _junk, "quality": _junk}))  # fmt: skip
def test_fuzz_images(demo_client, body):
    _no_5xx(demo_client, "/v1/images/generations", body)


def _wav_claiming_hours(hours=10, rate=16000) -> bytes:
    """A WAV header whose data chunk claims `hours` of 16-bit mono audio, followed by 1 kB of it."""
    import struct

    size = rate * 2 * 3600 * hours
    header = (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    )
    return header + b"data" + struct.pack("<I", size) + b"\x01\x00" * 512


def test_poison_requests_fail_alone(demo_client):
    from PIL import Image

    from omnilm.processing.documents import build_pdf

    def part(kind, data):
        b64 = base64.b64encode(data).decode()
        if kind == "image":
            return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}}
        if kind == "audio":
            return {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
        return {"type": "file", "file": {"file_data": b64, "filename": "bomb.pdf"}}

    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), "black").save(tiny, format="PNG")
    pdf = build_pdf([[("text", f"page {i}")] for i in range(300)])  # over the 200-page limit
    poison = [
        [part("image", tiny.getvalue()), {"type": "text", "text": "which digit is this?"}],
        [part("audio", _wav_claiming_hours()), {"type": "text", "text": "which number was dialled?"}],
        [part("file", pdf), {"type": "text", "text": "what is the total?"}],
        "7 " * 50_000,  # 100k tokens
    ]
    good = {"messages": [{"role": "user", "content": "draw a 7"}], "max_tokens": 20}
    results = {}

    def send(i, body):
        results[i] = demo_client.post("/v1/chat/completions", headers=AUTH, json=body)

    bodies = [{"messages": [{"role": "user", "content": c}], "max_tokens": 4} for c in poison] + [good, good]
    threads = [threading.Thread(target=send, args=(i, b)) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = [results[i].status_code for i in range(len(bodies))]
    assert statuses[0] == 200  # a 1x1 image is an image: resized, answered
    assert statuses[1:4] == [400, 400, 400], [results[i].json() for i in (1, 2, 3)]
    assert results[3].json()["error"]["code"] == "context_length_exceeded"
    assert statuses[4:] == [200, 200]
    assert results[4].json()["choices"][0] == results[5].json()["choices"][0]


def test_audio_out_needs_an_audio_head(demo_client):
    body = {"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"], "max_tokens": 2}
    r = demo_client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "modalities"


def test_completions_take_token_ids_like_lm_eval(demo_client):
    tok = demo_client.app.state.omnilm.backend.processor.tokenizer
    ids = tok.encode("draw a 7", add_bos=True)
    body = {"prompt": [ids, ids[:3]], "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    r = demo_client.post("/v1/completions", headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    a, b = r.json()["choices"]
    assert len(a["logprobs"]["token_logprobs"]) == len(ids) + 1  # the prompt's, then the generated token's
    assert a["logprobs"]["token_logprobs"][:3] == pytest.approx(b["logprobs"]["token_logprobs"][:3], abs=1e-4)
    bad = demo_client.post("/v1/completions", headers=AUTH, json={"prompt": [1, 6, 5], "max_tokens": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"  # 6 is the image placeholder
