"""User-facing errors. Every failure a user can cause raises a subclass of OmniLMError.

OmniLMError is a ValueError so plain `except ValueError` callers keep working. The CLI prints
`error: <message>` on one line and exits with code 2 for any of these.
"""


class OmniLMError(ValueError):
    """Base class of every user-facing OmniLM error."""


class ConfigError(OmniLMError):
    """An unknown preset, a bad config value or an inconsistent combination of values."""


class CheckpointError(OmniLMError):
    """A checkpoint that is missing, malformed, unsafe (pickle) or does not match the model."""


class MediaError(OmniLMError):
    """An image, audio clip or document that cannot be decoded or exceeds a limit."""


class ContextLengthError(OmniLMError):
    """A prompt (plus the tokens asked for) that does not fit the model's context."""


class QueueFullError(OmniLMError):
    """The generation engine's waiting queue is full; the server answers 429 (try again later)."""
