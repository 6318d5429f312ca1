"""A real `omnilm serve --model demo` process on 127.0.0.1, driven by the official openai client.

The demo's answers through the API must equal `omnilm generate`'s for the same inputs.
"""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _health(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _start(tmp_path_factory, *flags):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMNILM_API_KEY": KEY}
    log = tmp_path_factory.mktemp("server") / "log.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "omnilm", "serve", "--model", "demo", "--port", str(port), *flags],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 90
    while _health(port) != 200:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc, port


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, port = _start(
        tmp_path_factory, "--max-queue", "8", "--engine", "process"
    )  # auto's choice on 2+ cores
    yield proc, port
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    _, port = server
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A digit PNG, a dialled number WAV and an invoice PDF, as files (for the CLI) and bytes."""
    import soundfile

    from omnilm.demo.data import dtmf_clip, load_digits, render_digit
    from omnilm.processing.documents import build_pdf

    d = tmp_path_factory.mktemp("media")
    _, _, test_x, test_y = load_digits(seed=0)
    render_digit(test_x[3], 16).save(d / "digit.png")
    soundfile.write(d / "dial.wav", dtmf_clip("4821", np.random.default_rng(5)), 16000)
    pdf = build_pdf([[("text", "Invoice 5307 total 64"), ("image", render_digit(test_x[5], 32))]])
    (d / "invoice.pdf").write_bytes(pdf)
    return d


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _cli(capsys, *args) -> str:
    from omnilm.cli import main

    capsys.readouterr()
    assert main(["generate", "--model", "demo", *args]) == 0
    return capsys.readouterr().out.strip()


def test_demo_answers_equal_the_cli(client, inputs, capsys):
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(inputs / "digit.png")}}
    audio = {"type": "input_audio", "input_audio": {"data": _b64(inputs / "dial.wav"), "format": "wav"}}
    pdf = {"type": "file", "file": {"file_data": _b64(inputs / "invoice.pdf"), "filename": "invoice.pdf"}}
    cases = [
        (image, "which digit is this?", ["--image", str(inputs / "digit.png")]),
        (audio, "which number was dialled?", ["--audio", str(inputs / "dial.wav")]),
        (pdf, "what is the total?", ["--file", str(inputs / "invoice.pdf")]),
        (pdf, "what is the invoice number?", ["--file", str(inputs / "invoice.pdf")]),
    ]
    answers = []
    for part, question, cli_args in cases:
        r = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
            max_tokens=8,
        )
        got = r.choices[0].message.content
        args = [*cli_args, "--prompt", question, "--max-new-tokens", "8"]
        assert got == _cli(capsys, *args) == _cli(capsys, *args, "--chat"), question
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == len(got)  # one token per digit
        answers.append(got)
    assert answers[1] == "4821" and answers[2] == "64" and answers[3] == "5307"  # the demo is that good


def test_video_url_part_is_read_as_the_cli_reads_a_video(client, inputs, capsys):
    """vLLM's video_url part: the same prompt as a file part holding the clip and as `--video`; a
    video_url that holds no video is a 400 naming the part."""
    from omnilm.demo.data import load_digits, video_clip

    _, _, test_x, _ = load_digits(seed=0)
    clip = inputs / "clip.mp4"
    clip.write_bytes(video_clip(test_x[3], "4821", np.random.default_rng(1)))
    question = "which digit is shown and which number is dialled?"
    parts = {
        "video_url": {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + _b64(clip)}},
        "file": {"type": "file", "file": {"file_data": _b64(clip), "filename": "clip.mp4"}},
    }
    answers = {}
    for name, part in parts.items():
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": [part, {"type": "text", "text": question}]}],
            max_tokens=8, temperature=0,
        )  # fmt: skip
        answers[name] = r.choices[0].message.content
        assert r.usage.prompt_tokens > 20  # two frames and a second of sound, not the question alone
    cli = _cli(capsys, "--video", str(clip), "--prompt", question, "--max-new-tokens", "8")
    assert answers["video_url"] == answers["file"] == cli
    not_video = {
        "type": "video_url",
        "video_url": {"url": "data:video/mp4;base64," + _b64(inputs / "digit.png")},
    }
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [not_video]}])
    assert "messages[0].content[0]" in str(e.value) and "video" in str(e.value)


def test_text_stream_equals_non_stream(client, inputs):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "input_audio", "input_audio": {"data": _b64(inputs / "dial.wav"), "format": "wav"}},
                {"type": "text", "text": "which number was dialled?"},
            ],
        }
    ]
    whole = client.chat.completions.create(model="demo", messages=messages, max_tokens=8)
    chunks = list(
        client.chat.completions.create(
            model="demo", messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_n_seed_logprobs(client, inputs):
    audio = {"type": "input_audio", "input_audio": {"data": _b64(inputs / "dial.wav"), "format": "wav"}}
    messages = [{"role": "user", "content": [audio, {"type": "text", "text": "which number was dialled?"}]}]
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stop=["2"])
    assert r.choices[0].message.content == "48" and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="demo", messages=messages, max_tokens=2)
    assert r.choices[0].message.content == "48" and r.choices[0].finish_reason == "length"

    sampled = dict(
        model="demo", messages=[{"role": "user", "content": "draw a"}], max_tokens=6, temperature=1.5
    )
    a = client.chat.completions.create(**sampled, n=2, seed=11)
    b = client.chat.completions.create(**sampled, n=2, seed=11)
    assert len(a.choices) == 2 and [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens >= 2

    r = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content == "4821"
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
        assert t.token == t.top_logprobs[0].token  # greedy: the chosen token is the best one
    chunks = client.chat.completions.create(
        model="demo", messages=messages, max_tokens=8, logprobs=True, top_logprobs=1, stream=True
    )
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in content
    ]


def test_completions_echo_logprobs_for_loglikelihood(client):
    r = client.completions.create(model="demo", prompt="draw a 7", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "draw a 7"
    assert lp.tokens[0] == "<|begin_of_text|>" and lp.token_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:]) and len(lp.tokens) == r.usage.prompt_tokens
    g = client.completions.create(model="demo", prompt="which digit is this?", max_tokens=3)
    assert g.choices[0].finish_reason in ("stop", "length") and g.usage.prompt_tokens > 0


def test_images_generate_draws_a_png(client):
    from PIL import Image

    r = client.images.generate(model="demo", prompt="draw a 7", response_format="b64_json")
    img = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert img.format == "PNG" and img.size[0] > 1 and np.asarray(img).std() > 0


def test_errors_in_openai_shape(client, server):
    _, port = server
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert [m.id for m in client.models.list().data] == ["demo"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], temperature=9
        )
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "hi"}], extra_body={"best_of": 2}
        )
    assert e.value.body["param"] == "best_of" and "unsupported" in e.value.body["message"]
    bad_image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": [bad_image]}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "7 " * 500}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_auto_puts_the_engine_in_a_process_on_a_multicore_cpu(monkeypatch):
    import omnilm.threads
    from omnilm.serve import _engine_process

    monkeypatch.setattr(omnilm.threads, "physical_cores", lambda: 2)
    assert _engine_process("auto", None) and _engine_process("auto", "cpu")
    assert not _engine_process("auto", "cuda") and not _engine_process("thread", "cpu")
    monkeypatch.setattr(omnilm.threads, "physical_cores", lambda: 1)
    assert not _engine_process("auto", "cpu") and _engine_process("process", "cpu")


def test_weights_that_do_not_load_in_the_engine_process_are_one_error_line(tmp_path):
    """The processor loads (the server process) but the weights do not (the engine process): the
    engine process's error is the CLI's one line, exit 2."""
    import shutil

    import omnilm

    model = tmp_path / "broken"
    shutil.copytree(Path(omnilm.__file__).parent / "assets" / "demo", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "omnilm", "serve", "--model", str(model), "--port", str(_free_port()),
           "--engine", "process"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights}: header length"), lines


def test_a_model_that_does_not_load_is_one_error_line_and_exit_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "omnilm",
        "serve",
        "--model",
        str(tmp_path / "nope"),
        "--port",
        str(_free_port()),
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such checkpoint directory"]


def _engine_pids(server_pid: int) -> list[int]:
    """The engine processes `omnilm serve` spawned (serve/worker.py): one, or none with --engine thread."""
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_the_engine_thread_answers_as_the_engine_process(server, client, inputs, tmp_path_factory):
    """--engine thread (the model beside the event loop) and the default engine process on CPU give
    the demo's answers token for token."""
    proc, port = _start(tmp_path_factory, "--engine", "thread")
    try:
        assert _engine_pids(proc.pid) == [] and len(_engine_pids(server[0].pid)) == 1
        other = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        image = {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + _b64(inputs / "digit.png")},
        }
        audio = {"type": "input_audio", "input_audio": {"data": _b64(inputs / "dial.wav"), "format": "wav"}}
        for part, question in ((image, "which digit is this?"), (audio, "which number was dialled?")):
            messages = [{"role": "user", "content": [part, {"type": "text", "text": question}]}]
            a, b = (
                c.chat.completions.create(model="demo", messages=messages, max_tokens=8, logprobs=True)
                for c in (client, other)
            )
            assert a.choices[0].message.content == b.choices[0].message.content
            lp = [[t.logprob for t in r.choices[0].logprobs.content] for r in (a, b)]
            assert np.allclose(lp[0], lp[1], atol=1e-4)
        for p in (server[1], port):  # the gauges come from the engine, wherever it runs
            req = urllib.request.Request(
                f"http://127.0.0.1:{p}/metrics", headers={"Authorization": f"Bearer {KEY}"}
            )
            lines = urllib.request.urlopen(req, timeout=10).read().decode().splitlines()
            gauges = {
                line.split()[0]: float(line.split()[1])
                for line in lines
                if line.startswith(("omnilm_queue", "omnilm_running", "omnilm_kv"))
            }
            assert gauges["omnilm_queue_length"] == 0 and gauges["omnilm_running"] == 0, gauges
            assert 0 <= gauges["omnilm_kv_page_use"] < 1, gauges
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_a_dead_engine_process_is_503_not_a_hang(tmp_path_factory):
    """The engine process killed: the request in flight ends with an error, /health and new requests
    answer 503 in the OpenAI shape, and SIGTERM still stops the server."""
    proc, port = _start(tmp_path_factory, "--engine", "process")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "draw a 3"}], max_tokens=60, stream=True
        )
        next(iter(stream))
        (engine,) = _engine_pids(proc.pid)
        os.kill(engine, signal.SIGKILL)
        finish = [
            c.choices[0].finish_reason for c in stream if c.choices
        ]  # it ends instead of waiting forever
        assert finish[-1] == "error"
        deadline = time.time() + 10
        while _health(port) != 503 and time.time() < deadline:
            time.sleep(0.05)
        assert _health(port) == 503
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 503 and "engine" in e.value.body["message"]
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_client_disconnect_cancels_and_sigterm_drains(server, client):
    """Last in this file: a stream the client drops is cancelled; SIGTERM lets a running request
    finish, then the process exits 0."""
    proc, port = server
    stream = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "draw a 3"}], max_tokens=40, stream=True
    )
    next(iter(stream))
    stream.close()
    result = {}

    def long_request():
        result["r"] = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "draw a 5"}], max_tokens=40, temperature=0
        )

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result["r"].choices[0].finish_reason in ("stop", "length")
    assert proc.wait(30) == 0


@pytest.mark.slow
def test_backpressure_on_the_real_engine(tmp_path_factory):
    """Twice the capacity (2 running + 2 waiting) at once: the excess gets 429 with Retry-After, nothing
    5xx, and the server answers normally afterwards."""
    proc, port = _start(tmp_path_factory, "--max-queue", "2", "--max-batch", "2")
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120
        )
        outcomes = []

        def one():
            try:
                client.chat.completions.create(
                    model="demo", messages=[{"role": "user", "content": "draw a 4"}], max_tokens=40
                )
                outcomes.append(200)
            except openai.RateLimitError as e:
                outcomes.append((429, e.response.headers.get("retry-after")))
            except openai.APIStatusError as e:
                outcomes.append(e.status_code)

        for _ in range(3):
            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert all(o == 200 or o == (429, "1") for o in outcomes), outcomes
        assert len(outcomes) == 24 and outcomes.count(200) >= 4 and outcomes.count((429, "1")) >= 3
        r = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "draw a 4"}])
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
