"""The Qwen2-Audio processor: prompt text with `<|AUDIO|>` markers plus clips -> model inputs.

As transformers' Qwen2AudioProcessor: every clip becomes Whisper log-mel features padded to 30 s
(longer clips are cut at 30 s) with `feature_attention_mask` (N, 3000) marking its real mel frames;
the k-th `<|AUDIO|>` of the prompt expands to clip k's `output_lengths(frames)` tokens (the encoder's
conv stride and pool: ((L - 1) // 2 + 1 - 2) // 2 + 1). Prompts name the special tokens as text
(`<|audio_bos|><|AUDIO|><|audio_eos|>`), which are parsed as special tokens like transformers does.
"""

from __future__ import annotations

import math
import re

import torch

from ..errors import MediaError
from ..tokenizers.text import TextTokenizer
from .audio import AudioProcessor

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"


def audio_token_count(mel_frames: int) -> int:
    """Decoder tokens of a clip with mel_frames real frames (transformers' Qwen2AudioProcessor rule)."""
    return (((mel_frames - 1) // 2 + 1) - 2) // 2 + 1


class Qwen2AudioProcessor:
    prompt_format = "plain"  # prompts carry their own special tokens (Pipeline reads this)
    renders_chats = True  # chat messages through render_messages (Qwen2-Audio's ChatML), also when served

    def __init__(
        self, tokenizer: TextTokenizer, audio_processor: AudioProcessor, audio_token: str = AUDIO_TOKEN
    ):
        self.tokenizer = tokenizer
        self.audio_processor = audio_processor
        self.audio_token = audio_token
        self.audio_token_id = tokenizer.token_to_id(audio_token)
        if self.audio_token_id is None:
            raise MediaError(f"tokenizer {tokenizer.source} has no {audio_token} token")
        specials = [tokenizer.id_to_token(i) for i in tokenizer.special_ids] + [
            audio_token,
            AUDIO_BOS,
            AUDIO_EOS,
        ]
        specials = sorted(
            {s for s in specials if s and tokenizer.token_to_id(s) is not None}, key=len, reverse=True
        )
        self._special_re = re.compile("(" + "|".join(re.escape(s) for s in specials) + ")")

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, its special-token strings as their ids (no bos, as Qwen2's tokenizer)."""
        ids = []
        for i, piece in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.tokenizer.token_to_id(piece))
            elif piece:
                ids.extend(self.tokenizer.encode(piece))
        return ids

    def audio_features(self, audio, sampling_rate: int | None = None) -> dict:
        """Clips -> input_features (N, n_mels, 3000), feature_attention_mask (N, 3000), token counts."""
        ap = self.audio_processor
        n_max, hop = ap.samples_per_window, ap.hop_length
        wavs = [ap.load(clip, sampling_rate)[:n_max] for clip in audio]
        features = ap(wavs)["input_features"]  # one window per clip, zero-padded to 30 s
        mask = torch.zeros(len(wavs), n_max // hop, dtype=torch.long)
        for i, w in enumerate(wavs):  # WhisperFeatureExtractor's sample mask read every hop_length
            mask[i, : math.ceil(w.shape[0] / hop)] = 1
        counts = [audio_token_count(int(m.sum())) for m in mask]
        return {"input_features": features, "feature_attention_mask": mask, "num_audio_tokens": counts}

    def render_messages(self, messages, add_generation_prompt: bool = True) -> tuple[str, list]:
        """Chat messages -> (prompt text, audio sources in order) by Qwen2-Audio's chat template (ChatML, a
        default system turn, each audio part as "Audio k: <|audio_bos|><|AUDIO|><|audio_eos|>\\n")."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise MediaError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        text, sources = "", []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise MediaError(f"messages[{i}] must be a dict with 'role' and 'content'")
            if i == 0 and m["role"] != "system":
                text += "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            text += f"<|im_start|>{m['role']}\n"
            content = m["content"]
            if isinstance(content, str):
                text += content
            else:
                for part in content:
                    if part.get("type") == "audio" or "audio" in part or "audio_url" in part:
                        sources.append(part.get("audio", part.get("audio_url")))
                        text += f"Audio {len(sources)}: {AUDIO_BOS}{self.audio_token}{AUDIO_EOS}\n"
                    elif "text" in part:
                        text += part["text"]
            text += "<|im_end|>\n"
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return text, sources

    def __call__(
        self,
        text=None,
        audio=None,
        sampling_rate: int | None = None,
        images=None,
        files=None,
        messages=None,
        add_generation_prompt: bool | None = None,
    ) -> dict:
        """text: a string or a list of strings (left-padded batch); audio: clips in `<|AUDIO|>` order.
        -> input_ids, attention_mask, input_features, feature_attention_mask (None where absent)."""
        if images or files:
            raise MediaError("Qwen2-Audio reads audio and text only; images and files are not supported")
        audio = [] if audio is None else list(audio) if isinstance(audio, (list, tuple)) else [audio]
        if messages is not None:  # audio parts without a source take the next clip of `audio`
            text, sources = self.render_messages(messages, add_generation_prompt is not False)
            given = iter(audio)
            audio = [src if src is not None else next(given, None) for src in sources]
            if any(a is None for a in audio) or next(given, None) is not None:
                raise MediaError(
                    f"the messages have {len(sources)} audio part(s) but the clips do not match them"
                )
        texts = [] if text is None else [text] if isinstance(text, str) else list(text)
        n_markers = sum(t.count(self.audio_token) for t in texts)
        if texts and n_markers != len(audio):
            raise MediaError(
                f"the prompt has {n_markers} {self.audio_token} marker(s) but {len(audio)} audio clip(s) were given"
            )
        out = dict.fromkeys(
            ("input_ids", "attention_mask", "pixel_values", "input_features", "feature_attention_mask")
        )
        counts = []
        if audio:
            feats = self.audio_features(audio, sampling_rate)
            counts = feats.pop("num_audio_tokens")
            out.update(feats)
        if texts:
            rows, k = [], 0
            for t in texts:
                row = []
                for tok in self.encode(t):
                    n = counts[k] if tok == self.audio_token_id else 1
                    k += tok == self.audio_token_id
                    row.extend([tok] * n)
                rows.append(row)
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id or 0
            out["input_ids"] = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
            out["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return out

    @classmethod
    def from_pretrained(cls, path) -> Qwen2AudioProcessor:
        from ..convert.hf import read_config
        from ..convert.qwen2_audio import audio_config_from_hf

        hf = read_config(path)
        audio_cfg = audio_config_from_hf(hf.get("audio_config") or {})
        ap = AudioProcessor.from_pretrained(path)
        if ap.kind != "whisper" or ap.num_mel_bins != audio_cfg.num_mel_bins:
            raise MediaError(
                f"{path}/preprocessor_config.json: a {ap.kind} front end with {ap.num_mel_bins} mel bins, but "
                f"the Qwen2-Audio encoder takes Whisper log-mel with {audio_cfg.num_mel_bins} bins"
            )
        return cls(TextTokenizer.from_dir(path), ap)
