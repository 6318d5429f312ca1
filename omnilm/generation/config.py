"""GenerationConfig: every setting of one generation request, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from ..errors import ConfigError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None  # CTRL-style, over prompt and generated ids
    presence_penalty: float = 0.0  # OpenAI-style: minus this once a token appeared
    frequency_penalty: float = 0.0  # OpenAI-style: minus this times the token's count so far
    seed: int | None = None  # a request's own generator: the same seed samples the same, whatever the batch
    eos_token_id: int | list[int] | None = None  # None: the model's; [] or (): none
    pad_token_id: int | None = None  # fills finished rows of a batch (None: the model's, else the first eos)
    stop_strings: tuple[str, ...] = ()  # checked on the text, a layer above the engine
    guidance_scale: float | None = None  # classifier-free guidance of image spans (discrete models)
    logprobs: int | None = None  # report the chosen token's logprob and this many top alternatives

    def __post_init__(self):
        def bad(name, expected):
            raise ConfigError(f"generation setting {name}={getattr(self, name)!r}: expected {expected}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            bad("max_new_tokens", "an integer >= 0")
        if self.temperature < 0:
            bad("temperature", "a number >= 0")
        if self.top_k is not None and self.top_k < 1:
            bad("top_k", "an integer >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad("top_p", "a number in (0, 1]")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad("min_p", "a number in [0, 1]")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            bad("repetition_penalty", "a number > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "an integer in [0, 20]")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        self.stop_strings = tuple(self.stop_strings)

    def updated(self, **changes) -> GenerationConfig:
        """A copy with some settings changed; None values leave a setting as it is."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown generation setting(s): {', '.join(unknown)}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def guided(self) -> bool:
        return self.guidance_scale is not None and self.guidance_scale != 1.0
