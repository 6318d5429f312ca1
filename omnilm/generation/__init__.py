"""Generation: the one engine (continuous batching over paged KV), its config, processors and sampling."""

from ..errors import QueueFullError
from .config import GenerationConfig
from .engine import Engine, Event, Request

__all__ = ["Engine", "Event", "GenerationConfig", "QueueFullError", "Request"]
