"""`omnilm serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the generation backend."""

from __future__ import annotations


def serve(model, host="127.0.0.1", port=8000, api_key=None, max_queue=64, max_batch=16, device=None,
          dtype=None, allow_media_url=False, allow_local_media=None, drain_seconds=30.0):  # fmt: skip
    """Run the server until SIGINT/SIGTERM; on SIGTERM in-flight requests get `drain_seconds` to finish."""
    import uvicorn

    from .app import create_app

    def load():
        from .backend import Backend  # imports torch: in the loading thread, after the socket is open

        return Backend.load(model, device=device, dtype=dtype, max_batch=max_batch, max_queue=max_queue)

    name = model if isinstance(model, str) and "/" not in model else str(model).rstrip("/").split("/")[-1]
    app = create_app(load, api_key=api_key, allow_media_url=allow_media_url, allow_local_media=allow_local_media,
                     model_name=name, load_on_startup=False)  # fmt: skip
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_seconds
    )
    _server(config, app.state.omnilm).run()


def _server(config, state):
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            state.start_loading()  # the socket listens: /health answers 503 while the model loads

        def handle_exit(self, sig, frame):
            # uvicorn re-raises a caught SIGTERM after its graceful shutdown (exit status -15); a
            # drained server exits 0 instead, so supervisors read a clean stop
            super().handle_exit(sig, frame)
            if sig == signal.SIGTERM:
                self._captured_signals.remove(sig)

    return Server(config)
