"""The server's door to generation: a Pipeline (model, processor, defaults) and its Engine, in this
process (`--engine thread`; on CPU the server runs this same Backend in an engine process of its own and
talks to it through serve/worker.py's RemoteBackend, which has the interface below).

`submit(prompt_ids, cfg, media, on_event)` is the continuous-batching engine's own (a full queue
raises QueueFullError at once; `cancel()` frees a request's KV pages before the next step). The rest
is what the HTTP layer reads: queue and page-pool use for /metrics, the end ids, media decoding, and
`score` for prompt logprobs (`echo`), one forward pass without the cache.
torch is imported where it is used, so the server's socket opens before the import is done.
"""

from __future__ import annotations

from ..errors import QueueFullError
from ..generation.config import GenerationConfig

__all__ = ["Backend", "GenerationConfig", "QueueFullError"]


class Backend:
    def __init__(self, pipeline, prepack: bool = False):
        self.pipeline = pipeline
        self.processor = pipeline.processor
        self.model = pipeline.model
        if prepack:  # before the engine takes the model: CPU linears packed once (serve/prepack.py)
            from .prepack import prepack_linears

            prepack_linears(self.model, batch_hint=pipeline.max_batch)
        self.model_dir = pipeline.model_dir
        self.engine = pipeline.engine  # started: a background thread drives engine.step()
        self.context = self.model.config.decoder.max_seq_len
        self.eos_ids = frozenset(pipeline.eos_ids(pipeline.generation_config))

    @classmethod
    def load(cls, model, device=None, dtype=None, max_batch: int = 16, max_queue: int = 64,
             prepack: bool = False) -> Backend:  # fmt: skip
        from ..pipeline import Pipeline

        pipe = Pipeline.from_pretrained(
            model, device=device, dtype=dtype, max_batch=max_batch, max_queue=max_queue
        )
        return cls(pipe, prepack=prepack)

    def submit(self, prompt_ids, cfg: GenerationConfig, media=None, on_event=None):
        if cfg.eos_token_id is None:
            cfg = cfg.updated(eos_token_id=sorted(self.eos_ids))
        return self.engine.submit(prompt_ids, cfg, media, on_event=on_event)

    def stats(self) -> tuple[int, int, float]:
        """(requests waiting, requests running or prefilling, fraction of KV pages in use) for /metrics."""
        engine, pool = self.engine, self.engine.pool
        return (
            len(engine.waiting),
            len(engine.running) + len(engine.prefilling),
            1.0 - pool.free / pool.num_pages,
        )

    def decode_media(self, ids):
        """(PIL images, (waveform, rate) pairs) of the complete image/audio spans in ids."""
        return self.pipeline.decode_media(list(ids))

    def stop(self):
        self.pipeline.close()

    def score(self, ids, media=None, top_n: int = 0):
        """[(logprob of ids[i], [(id, logprob)] top_n alternatives)] for i = 1..len(ids)-1."""
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
