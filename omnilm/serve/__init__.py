"""`omnilm serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation backend."""

from __future__ import annotations


def serve(model, host="127.0.0.1", port=8000, api_key=None, max_queue=64, max_batch=16, device=None,
          dtype=None, allow_media_url=False, allow_local_media=None, drain_seconds=30.0, threads=None, prepack=True,
          engine="auto"):  # fmt: skip
    """Run the server until SIGINT/SIGTERM; on SIGTERM in-flight requests get `drain_seconds` to finish.
    A model that fails to load stops the server and raises its error (the CLI's one-line `error:`).
    threads: torch's intra-op threads (default: threads.serving_threads, one core left to HTTP).
    prepack: the decoder's CPU linears with weights packed once for oneDNN (serve/prepack.py).
    engine: "process" (the model and its engine in a child process, serve/worker.py), "thread" (in this
    process, beside the event loop), or "auto": a process on a CPU of two or more cores, else a thread
    (an accelerator's ops run asynchronously, so there the GIL is not what the engine waits for)."""
    import gc

    import uvicorn

    from ..errors import OmniLMError
    from .app import create_app

    failure = []

    def load():
        try:
            process = _engine_process(engine, device)
            if process:  # spawned before torch is imported here: the child imports it meanwhile
                from .worker import RemoteBackend

                backend = RemoteBackend(model, device=device, dtype=dtype, max_batch=max_batch,
                                        max_queue=max_queue, prepack=prepack, threads=threads)  # fmt: skip
            from ..threads import (
                set_threads,
            )  # imports torch: in the loading thread, after the socket is open

            # before prepacking, whose kernels are built per thread count (the engine process sets its own)
            n, why = set_threads(threads, serving=True)
            if not process:
                from .backend import Backend

                backend = Backend.load(model, device=device, dtype=dtype, max_batch=max_batch, max_queue=max_queue,
                                       prepack=prepack)  # fmt: skip
            where = "an engine process" if process else "an engine thread"
            print(f"omnilm serve: the model in {where}, {n} torch threads ({why})", flush=True)
        except Exception as e:
            failure.append(e)
            server.should_exit = True  # a server without its model is of no use
            raise
        # What is alive now (torch, the model, every module) lives as long as the server: moved out of
        # the collector's reach, so a full collection, triggered by the garbage of requests, scans
        # only what requests made. Measured: a 93 ms full collection on the event loop stalled the
        # engine thread (waiting for the GIL) mid-step under 16 streaming clients.
        gc.collect()
        gc.freeze()
        print(f"omnilm serve: {name} ready", flush=True)
        return backend

    name = model if isinstance(model, str) and "/" not in model else str(model).rstrip("/").split("/")[-1]
    app = create_app(load, api_key=api_key, allow_media_url=allow_media_url, allow_local_media=allow_local_media,
                     model_name=name, load_on_startup=False)  # fmt: skip
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_seconds
    )
    server = _server(config, app.state.omnilm)
    server.run()
    if failure:
        e = failure[0]
        raise (
            e if isinstance(e, OmniLMError) else OmniLMError(f"cannot load {model}: {type(e).__name__}: {e}")
        )


def _server(config, state):
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            state.start_loading()  # the socket listens: /health answers 503 while the model loads
            url = f"http://{config.host}:{config.port}"
            print(
                f"omnilm serve: {url}/ (web page), {url}/v1 (OpenAI API); loading {state.model_name}",
                flush=True,
            )

        def handle_exit(self, sig, frame):
            # uvicorn re-raises a caught SIGTERM after its graceful shutdown (exit status -15); a
            # drained server exits 0 instead, so supervisors read a clean stop
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    return Server(config)


def _engine_process(engine: str, device) -> bool:
    """auto: a process on CPU when the HTTP front end can have a core of its own. On one core the two
    processes take turns at it and a thread does better (bench_serve pinned to one CPU, 16 clients:
    2153 tok/s as a process, 2354 as a thread; with two cores 2459 vs 2111)."""
    if engine != "auto":
        return engine == "process"
    from ..threads import physical_cores

    return str(device or "cpu") == "cpu" and physical_cores() >= 2  # device None: the loaders' CPU
