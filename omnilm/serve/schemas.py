"""Request bodies of the OpenAI-compatible routes, with a limit on every field.

Unknown fields are refused (extra="forbid"), so a parameter the server does not implement is a 400
naming it, never silently ignored. Limits on media bytes here are on the base64 text; the processors
check pixels, seconds and pages before decoding.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 1_000_000  # characters in one text field (the prompt is also checked in tokens)
MAX_B64 = 48 * 1024 * 1024  # base64 characters of one medium (~36 MB decoded); the body cap applies first
MAX_MESSAGES = 256
MAX_PARTS = 64
MAX_STOP = 4
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_TOKENS = 1_000_000  # the model's context is the real limit, checked per request
MAX_SEED = 2**63 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, str_max_length=MAX_B64)


Text = Annotated[str, Field(max_length=MAX_TEXT)]
Stop = Annotated[str, Field(min_length=1, max_length=256)]


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ImageURL(Strict):
    url: Annotated[str, Field(min_length=1, max_length=MAX_B64)]
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Strict):
    data: Annotated[str, Field(min_length=1, max_length=MAX_B64)]
    format: Literal["wav", "mp3", "flac", "ogg"]


class AudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileData(Strict):
    file_data: Annotated[str, Field(min_length=1, max_length=MAX_B64)]
    filename: Annotated[str, Field(max_length=255)] | None = None


class FilePart(Strict):
    type: Literal["file"]
    file: FileData


class VideoURL(Strict):
    url: Annotated[str, Field(min_length=1, max_length=MAX_B64)]


class VideoPart(Strict):  # vLLM's extension of the OpenAI parts: {"type": "video_url", "video_url": {"url"}}
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | AudioPart | FilePart | VideoPart, Field(discriminator="type")]


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[Part], Field(min_length=1, max_length=MAX_PARTS)]
    name: Annotated[str, Field(max_length=64)] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class AudioOut(Strict):
    format: Literal["wav"] = "wav"
    voice: Annotated[str, Field(max_length=64)] | None = None


class Sampling(Strict):
    """Fields shared by chat and text completions."""

    model: Annotated[str, Field(max_length=256)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(ge=1, le=100_000)] | None = None  # extension
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None  # extension
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None  # extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    modalities: Annotated[list[Literal["text", "audio"]], Field(min_length=1, max_length=2)] | None = None
    audio: AudioOut | None = None


Prompt = Annotated[str, Field(max_length=MAX_TEXT)]


class CompletionRequest(Sampling):
    # text, texts, token ids, or lists of token ids (lm-evaluation-harness sends ids)
    prompt: (
        Prompt
        | Annotated[list[Prompt], Field(min_length=1, max_length=32)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_TOKENS)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
            Field(min_length=1, max_length=32),
        ]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class ImageRequest(Strict):
    prompt: Annotated[str, Field(min_length=1, max_length=4000)]
    model: Annotated[str, Field(max_length=256)] | None = None
    n: Annotated[int, Field(ge=1, le=4)] = 1
    size: Annotated[str, Field(max_length=16)] | None = None
    response_format: Literal["b64_json"] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None  # extension
    guidance_scale: Annotated[float, Field(ge=0.0, le=20.0)] | None = None  # extension
    user: Annotated[str, Field(max_length=256)] | None = None
