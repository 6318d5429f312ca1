"""The engine in a process of its own: the server's Backend interface over a pipe.

In one process the engine thread and the HTTP event loop take turns at the GIL: every torch op of a
decode step gives it up, and while the loop parses requests or writes a token to sixteen sockets the
engine waits to get it back (measured on a 2-core VM, 16 streaming clients: a 5.0 ms step took 5.7 ms,
the first step of a wave of requests 27 ms for 11 ms of work). Here the engine runs in a child
process with the model (as vLLM's engine core does) and the server process keeps the processor: it
renders prompts, detokenizes and writes HTTP, and the two exchange token ids.

Messages are pickled tuples over a multiprocessing pipe (both ends are this package):
    server -> engine: ("submit", rid, prompt_ids, config, media) | ("cancel", rid) | ("call", cid, name, args)
                      | ("stop",)
    engine -> server: ("ready", info) | ("failed", error) | ("reply", cid, ok, value)
                      | ("events", [(rid, token, logprob, top_logprobs, finish_reason, error), ...])
A submit is answered at once (a full queue or a prompt over the context raises in the caller, as
Engine.submit does); a step's events go in one message, sent by the engine thread after the step.
score (prompt logprobs) and decode_media (image/audio out) run in the engine process, which has the
model; the server process loads no weights.
"""

from __future__ import annotations

import itertools
import pickle
import threading
from types import SimpleNamespace

from ..errors import OmniLMError

READY_TIMEOUT = 600.0  # seconds for the engine process to load the model


class RemoteRequest:
    """The server's handle of one engine request: cancel() frees its pages before the next step."""

    def __init__(self, backend: RemoteBackend, rid: int):
        self.backend, self.rid = backend, rid
        self.cancelled = False

    def cancel(self, reason: str = "cancelled"):
        if not self.cancelled:
            self.cancelled = True
            self.backend._send(("cancel", self.rid, reason), quiet=True)


class RemoteBackend:
    """serve/backend.py's Backend, with the model and its engine in a child process."""

    def __init__(self, model, device=None, dtype=None, max_batch: int = 16, max_queue: int = 64,
                 prepack: bool = False, threads: int | None = None):  # fmt: skip
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no threads or locks inherited
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_main, name="omnilm-engine", daemon=True,
                                args=(child, model, device, dtype, max_batch, max_queue, prepack, threads))  # fmt: skip
        self.proc.start()  # first: it imports torch and loads the model while this process loads its processor
        child.close()
        self._send_lock = threading.Lock()
        self._callbacks: dict[int, object] = {}
        self._replies: dict[int, list] = {}
        self._ids = itertools.count()
        self._dead: str | None = None
        try:
            from ..pipeline import Pipeline

            self.pipeline = Pipeline.from_pretrained(model)  # the processor; the weights stay in the child
            self.processor = self.pipeline.processor
            self.model_dir = self.pipeline.model_dir
            self.eos_ids = frozenset(self.pipeline.eos_ids(self.pipeline.generation_config))
            kind, info = self._recv_ready()
            if kind == "failed":
                raise info
        except BaseException:
            self.proc.terminate()
            self.proc.join(10)
            raise
        self.model = SimpleNamespace(config=info["config"])
        self.context = info["context"]
        self._receiver = threading.Thread(target=self._receive, name="omnilm-engine-events", daemon=True)
        self._receiver.start()

    def _recv_ready(self):
        import time

        deadline = time.monotonic() + READY_TIMEOUT
        while not self.conn.poll(0.5):
            if not self.proc.is_alive():
                raise OmniLMError(f"the engine process exited while loading (exit code {self.proc.exitcode})")
            if time.monotonic() > deadline:
                self.proc.terminate()
                raise OmniLMError(f"the engine process did not load the model in {READY_TIMEOUT:.0f} s")
        try:
            return pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            raise OmniLMError("the engine process exited while loading") from None

    # ---- the Backend interface ------------------------------------------------------------------------

    def submit(self, prompt_ids, cfg, media=None, on_event=None) -> RemoteRequest:
        rid = next(self._ids)
        self._callbacks[rid] = on_event
        try:
            self._call("submit", rid, list(prompt_ids), cfg, media or {})
        except BaseException:
            self._callbacks.pop(rid, None)
            raise
        return RemoteRequest(self, rid)

    def score(self, ids, media=None, top_n: int = 0):
        return self._call("score", list(ids), media or {}, top_n)

    def decode_media(self, ids):
        return self._call("decode_media", list(ids))

    def stats(self) -> tuple[int, int, float]:
        return self._call("stats")

    @property
    def alive(self) -> bool:
        return self._dead is None and self.proc.is_alive()

    @property
    def alive_error(self) -> str:
        return f"the engine process is gone ({self._dead or f'exit code {self.proc.exitcode}'})"

    def stop(self):
        if self.proc.is_alive():
            self._send(("stop",), quiet=True)
            self.proc.join(60)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        self.conn.close()

    # ---- the pipe ---------------------------------------------------------------------------------------

    def _send(self, msg, quiet=False):
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            with self._send_lock:
                self.conn.send_bytes(data)
        except (OSError, ValueError):
            if not quiet:
                raise RuntimeError(f"the engine process is gone ({self._dead or 'pipe closed'})") from None

    def _call(self, name, *args):
        """Run `name` in the engine process and return its result (its exception raised here)."""
        if self._dead:
            raise RuntimeError(f"the engine process is gone ({self._dead})")
        cid = next(self._ids)
        slot = self._replies[cid] = [threading.Event(), None]
        self._send(("call", cid, name, args))
        slot[0].wait()
        ok, value = self._replies.pop(cid)[1]
        if not ok:
            raise value
        return value

    def _receive(self):
        """The events of every step, handed to each request's on_event; replies to calls."""
        from ..generation import Event

        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                break
            if msg[0] == "events":
                for rid, *fields in msg[1]:
                    callback = self._callbacks.get(rid)
                    ev = Event(*fields)
                    if ev.finish_reason is not None:
                        self._callbacks.pop(rid, None)
                    if callback is not None:
                        try:
                            callback(ev)
                        except Exception:  # a closed event loop at shutdown: the other requests go on
                            pass
            elif msg[0] == "reply":
                slot = self._replies.get(msg[1])
                if slot is not None:
                    slot[1] = (msg[2], msg[3])
                    slot[0].set()
        # the engine process ended: nothing more will come for what is in flight
        self._dead = f"exit code {self.proc.exitcode}" if not self.proc.is_alive() else "pipe closed"
        error = RuntimeError(f"the engine process is gone ({self._dead})")
        for rid in list(self._callbacks):
            callback = self._callbacks.pop(rid, None)
            if callback is not None:
                callback(Event(None, finish_reason="error", error=error))
        for slot in list(self._replies.values()):
            slot[1] = (False, error)
            slot[0].set()


def _engine_main(conn, model, device, dtype, max_batch, max_queue, prepack, threads):
    """The engine process: load the model, start the engine, answer the server until it says stop."""
    import gc
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the server stops us
    send_lock = threading.Lock()

    def send(msg):
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with send_lock:
            conn.send_bytes(data)

    try:
        from ..threads import set_threads
        from .backend import Backend

        set_threads(threads, serving=True)
        backend = Backend.load(model, device=device, dtype=dtype, max_batch=max_batch, max_queue=max_queue,
                               prepack=prepack)  # fmt: skip
    except Exception as e:
        send(("failed", _portable(e)))
        return
    gc.collect()
    gc.freeze()  # what lives as long as the engine is out of the collector's reach (serve/__init__.py)
    engine = backend.engine
    outbox: list = []

    def flush():  # after each step, in the engine thread: its events in one message
        if outbox:
            items = outbox[:]
            del outbox[: len(items)]
            send(("events", items))

    def on_event(rid, ev):
        error = None if ev.error is None else _portable(ev.error)
        outbox.append((rid, ev.token, ev.logprob, ev.top_logprobs, ev.finish_reason, error))
        if ev.finish_reason is not None:
            requests.pop(rid, None)

    engine.after_step = flush
    requests: dict = {}
    calls = {
        "score": backend.score,
        "decode_media": backend.decode_media,
        "stats": backend.stats,
    }
    # a forward over a long prompt (score) or an image decode runs beside this loop, which must stay
    # free for submits: the server's event loop waits for each submit's answer
    from concurrent.futures import ThreadPoolExecutor

    slow = ThreadPoolExecutor(1, thread_name_prefix="omnilm-calls")

    def answer(cid, name, args):
        try:
            send(("reply", cid, True, calls[name](*args)))
        except Exception as e:
            send(("reply", cid, False, _portable(e)))

    send(("ready", {"config": backend.model.config, "context": backend.context}))
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the server is gone
            break
        if msg[0] == "stop":
            break
        if msg[0] == "cancel":
            req = requests.get(msg[1])
            if req is not None:  # in flight, so the engine is stepping: its next step frees the pages
                req.cancel(msg[2])
            continue
        _, cid, name, args = msg
        if name in ("score", "decode_media"):
            slow.submit(answer, cid, name, args)
            continue
        try:
            if name == "submit":
                rid, prompt, cfg, media = args
                req = backend.submit(prompt, cfg, media, on_event=lambda ev, rid=rid: on_event(rid, ev))
                requests[rid] = req
                if req.finished:  # it ended before it was filed here (on_event found nothing to drop)
                    requests.pop(rid, None)
                value = None
            else:
                value = calls[name](*args)
            reply = ("reply", cid, True, value)
        except Exception as e:
            reply = ("reply", cid, False, _portable(e))
        send(reply)
    slow.shutdown(wait=True)
    backend.stop()  # cancels what is still in flight
    flush()
    conn.close()


def _portable(error: Exception) -> Exception:
    """error as it crosses the pipe: OmniLM's own errors as they are (the server maps them to 4xx),
    anything else as a RuntimeError naming it (a server error either way)."""
    if isinstance(error, OmniLMError) and type(error).__module__ == "omnilm.errors":
        return error
    return RuntimeError(f"{type(error).__name__}: {error}")
