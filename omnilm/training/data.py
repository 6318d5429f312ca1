"""Training data: JSONL samples -> token ids and labels -> packed rows -> a resumable loader.

A line is {"text": "..."} (every token is learned) or {"messages": [...]} (a conversation rendered by
omnilm.tokenizers.chat; only assistant tokens are learned). Media parts in messages name files
relative to the JSONL file; the multimodal processor turns them into placeholder spans and tensors.

Packing puts several samples in one row of `seq_len` tokens. Each token carries the index of its
document, and attention is block-diagonal and causal over those indices (a boolean (B, 1, T, T) mask
the decoder uses as is), with positions restarting at 0 per document. A document's first token is
never a target (it would be predicted from the previous document), so a packed row's loss is exactly
the sum of its samples' losses alone.

Cross-attention models (Mllama, `omnilm compose --fusion cross-attention`) take their images
through the cross-attention layers: an image marker stays one <|image|> token, and the sample keeps
its tiles, aspect-ratio ids/mask and its cross-attention mask (`TiledImages`), all made by the
model's MllamaProcessor. Such samples are never packed: a token before its sample's first image
attends to every image of its row (transformers' rule), so a row shared with another sample would
mix their images.

The loader's position (epoch, rows consumed) is part of the checkpoint: a resumed run sees exactly
the batches an uninterrupted one would. Batches are cut from one global order, the same for any
number of processes; each process takes its contiguous share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, MediaError

IGNORE = -100  # label of tokens that are not learned (prompt, padding, document starts)
MEDIA_PART_TYPES = ("image", "audio", "file")


@dataclass
class Sample:
    """One tokenized sample. labels[i] is the label of ids[i] (the loss shifts by one)."""

    ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int]] = field(
        default_factory=list
    )  # [start, end) of each media item's placeholders
    media: list[tuple[str, torch.Tensor]] = field(
        default_factory=list
    )  # ("image" | "audio", tensor) per span

    tiled: TiledImages | None = None  # cross-attention images (Mllama); then spans are the markers

    def __len__(self):
        return len(self.ids)


@dataclass
class TiledImages:
    """One sample's N images for cross-attention fusion, as MllamaProcessor gives them."""

    pixel_values: torch.Tensor  # (N, tiles, 3, t, t)
    aspect_ratio_ids: torch.Tensor  # (N,) 0 marks a padding image
    aspect_ratio_mask: torch.Tensor  # (N, tiles)
    cross_attention_mask: torch.Tensor  # (T, N, tiles): 1 where token t sees a tile of image i

    def cut(self, length: int, keep: int) -> TiledImages:
        """The first `length` tokens and the first `keep` images."""
        return TiledImages(
            self.pixel_values[:keep],
            self.aspect_ratio_ids[:keep],
            self.aspect_ratio_mask[:keep],
            self.cross_attention_mask[:length, :keep],
        )


# ---- reading and tokenizing ------------------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"training data not found: {path}")
    records = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(_utf8_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            except RecursionError:  # the C parser recurses per nesting level
                raise ConfigError(f"{path}:{n}: JSON nested too deep") from None
            if not isinstance(rec, dict) or ("text" in rec) == ("messages" in rec):
                raise ConfigError(f'{path}:{n}: expected an object with exactly one of "text" or "messages"')
            if "text" in rec and not isinstance(rec["text"], str):
                raise ConfigError(f'{path}:{n}: "text" must be a string')
            records.append(rec)
    if not records:
        raise ConfigError(f"training data {path} has no samples")
    return records


def encode_text(text: str, tokenizer) -> Sample:
    """bos + text + eos, all learned."""
    ids = tokenizer.encode(text, add_bos=tokenizer.bos_token_id is not None)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return Sample(ids, list(ids))


def encode_messages(messages, tokenizer, base_dir: Path, processor=None) -> Sample:
    """A conversation; only assistant content is learned. Media go through the multimodal processor."""
    from ..tokenizers.chat import render_chat_with_media

    messages = _resolve_media_paths(messages, base_dir)
    ids, mask, media = render_chat_with_media(messages, tokenizer)
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    if not media:
        return Sample(ids, labels)
    if processor is None:
        kinds = sorted({kind for kind, _ in media})
        raise ConfigError(f"a sample has {', '.join(kinds)} parts but the model has no processor for them")
    if is_cross_attention_processor(processor):
        return expand_tiled(ids, labels, media, processor, tokenizer)
    return expand_media(ids, labels, media, processor, tokenizer)


def expand_media(ids, labels, media, processor, tokenizer) -> Sample:
    """Replace each media marker by the processor's placeholders and keep the tensors.

    The processor (omnilm/processing/multimodal.py) alone decides how many placeholders an image or
    audio clip becomes; it is asked through `encode_media(kind, source)` -> (placeholder ids, tensor)
    where tensor is one image (3, H, W) or a stack of audio windows (n, ...)."""
    markers = {tokenizer.image_token_id: "image", tokenizer.audio_token_id: "audio"}
    out_ids, out_labels, spans, tensors = [], [], [], []
    items = iter(media)
    for tok, lab in zip(ids, labels):
        if tok not in markers:
            out_ids.append(tok)
            out_labels.append(lab)
            continue
        kind, source = next(items)
        placeholder_ids, tensor = processor.encode_media(kind, source)
        start = len(out_ids)
        out_ids += list(placeholder_ids)
        out_labels += [IGNORE] * len(placeholder_ids)  # features are inputs, never targets
        spans.append((start, len(out_ids)))
        tensors.append((kind, tensor))
    return Sample(out_ids, out_labels, spans, tensors)


def is_cross_attention_processor(processor) -> bool:
    from ..processing.mllama import MllamaProcessor

    return isinstance(processor, MllamaProcessor)


def expand_tiled(ids, labels, media, processor, tokenizer) -> Sample:
    """Cross-attention fusion: each image marker becomes the model's one <|image|> token (never a
    target); the images are tiled and the cross-attention mask built by the MllamaProcessor."""
    from ..processing.mllama import cross_attention_mask

    kinds = sorted({kind for kind, _ in media if kind != "image"})
    if kinds:
        raise ConfigError(
            f"a cross-attention (mllama) model takes images only, but the sample has {', '.join(kinds)}"
        )
    out_ids, out_labels, spans = [], [], []
    for tok, lab in zip(ids, labels):
        if tok == tokenizer.image_token_id:
            spans.append((len(out_ids), len(out_ids) + 1))
            tok, lab = processor.image_token_id, IGNORE
        out_ids.append(tok)
        out_labels.append(lab)
    images = processor.image_processor([[source for _, source in media]])
    cam = cross_attention_mask(
        [out_ids], images["num_tiles"], processor.image_token_id, processor.image_processor.max_num_tiles,
        len(out_ids),
    )  # fmt: skip
    tiled = TiledImages(
        images["pixel_values"][0], images["aspect_ratio_ids"][0], images["aspect_ratio_mask"][0], cam[0]
    )
    return Sample(out_ids, out_labels, spans, tiled=tiled)


def _resolve_media_paths(messages, base_dir: Path):
    """Media parts name files relative to the JSONL file; make them absolute (and check they exist)."""
    if not isinstance(messages, list):
        raise ConfigError('"messages" must be a list of {"role", "content"} objects')
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") in MEDIA_PART_TYPES:
                    key = next((k for k in (part["type"], "path") if isinstance(part.get(k), str)), None)
                    if key is not None:
                        p = Path(part[key])
                        p = p if p.is_absolute() else base_dir / p
                        if not p.is_file():
                            raise MediaError(f"media file not found: {p}")
                        part = {**part, key: str(p)}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def _utf8_lines(f, path):
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a block)") from None


def load_samples(path, tokenizer, processor=None) -> list[Sample]:
    path = Path(path)
    samples = []
    for n, rec in enumerate(read_jsonl(path), 1):
        try:
            if "text" in rec:
                sample = encode_text(rec["text"], tokenizer)
            else:
                sample = encode_messages(rec["messages"], tokenizer, path.parent, processor)
        except (ConfigError, MediaError) as e:
            raise type(e)(f"{path}: sample {n}: {e}") from None
        if sum(lab != IGNORE for lab in sample.labels[1:]) == 0:
            continue  # nothing to learn (e.g. a conversation without an assistant turn)
        samples.append(sample)
    if not samples:
        raise ConfigError(f"{path}: no sample has a learned token")
    return samples


# ---- truncation and packing -----------------------------------------------------------------------


def truncate(sample: Sample, max_len: int) -> Sample | None:
    """Cut to at most max_len tokens, never inside a media span: a span that would be cut is dropped
    whole with everything after it. None when nothing learnable is left."""
    if len(sample) <= max_len:
        return sample
    cut = max_len
    for start, end in sample.spans:
        if start < cut < end:
            cut = start
            break
    keep = sum(1 for _, end in sample.spans if end <= cut)
    tiled = None if sample.tiled is None else sample.tiled.cut(cut, keep)
    out = Sample(sample.ids[:cut], sample.labels[:cut], sample.spans[:keep], sample.media[:keep], tiled)
    if len(out) < 2 or all(lab == IGNORE for lab in out.labels[1:]):
        return None
    return out


def pack(
    samples: list[Sample], seq_len: int, packed: bool = True, overflow: str = "truncate"
) -> list[list[Sample]]:
    """Greedy packing in order: a row is closed when the next sample does not fit."""
    if packed and any(s.tiled is not None for s in samples):
        raise ConfigError(
            "data.pack: samples with cross-attention images cannot share a row (text before a "
            "sample's first image attends to every image of its row); set data.pack: false"
        )
    rows, row, used = [], [], 0
    for sample in samples:
        if len(sample) > seq_len:
            sample = truncate(sample, seq_len) if overflow == "truncate" else None
            if sample is None:
                continue
        if row and (not packed or used + len(sample) > seq_len):
            rows.append(row)
            row, used = [], 0
        row.append(sample)
        used += len(sample)
    if row:
        rows.append(row)
    if not rows:
        raise ConfigError(f"no sample fits in seq_len {seq_len}")
    return rows


def collate_rows(rows: list[list[Sample]], seq_len: int, pad_id: int) -> dict:
    """Rows of samples -> tensors: input_ids, labels, position_ids (B, T); attention_mask (B, 1, T, T)
    boolean, left out when each row is one whole document; pixel_values / input_features (media in
    row-major placeholder order). Cross-attention images: pixel_values (B, N, tiles, 3, t, t),
    aspect_ratio_ids (B, N), aspect_ratio_mask (B, N, tiles), cross_attention_mask (B, T, N, tiles),
    rows with fewer images padded with images of id 0 (which no token sees)."""
    B = len(rows)
    input_ids = torch.full((B, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)
    doc_ids = torch.full((B, seq_len), -1, dtype=torch.long)  # padding is one document of its own
    media = {"image": [], "audio": []}
    for b, row in enumerate(rows):
        offset = 0
        for d, sample in enumerate(row):
            n = len(sample)
            input_ids[b, offset : offset + n] = torch.tensor(sample.ids)
            sample_labels = torch.tensor(sample.labels)
            sample_labels[0] = IGNORE  # the document start is not predicted from the previous document
            labels[b, offset : offset + n] = sample_labels
            position_ids[b, offset : offset + n] = torch.arange(n)
            doc_ids[b, offset : offset + n] = d
            for kind, tensor in sample.media:
                media[kind].append(tensor if kind == "audio" else tensor[None])
            offset += n
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if (doc_ids != 0).any():  # several documents or padding in some row: document mask
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        mask = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T)
        batch["attention_mask"] = mask[:, None]  # (B, 1, T, T)
    # else every row is one document filling it: plain causal attention (flash kernels apply)
    if media["image"]:
        batch["pixel_values"] = torch.cat(media["image"])  # (N_images, 3, H, W)
    if media["audio"]:
        batch["input_features"] = torch.cat(media["audio"])  # (N_windows, ...)
    if any(sample.tiled is not None for row in rows for sample in row):
        batch.update(collate_tiled(rows, seq_len))
    return batch


def collate_tiled(rows: list[list[Sample]], seq_len: int) -> dict:
    tiled = [[s.tiled for s in row if s.tiled is not None] for row in rows]
    first = next(t for row in tiled for t in row)
    N = max(sum(len(t.aspect_ratio_ids) for t in row) for row in tiled)
    B, tiles = len(rows), first.pixel_values.shape[1]
    pixel_values = first.pixel_values.new_zeros(B, N, *first.pixel_values.shape[1:])
    ids = torch.zeros(B, N, dtype=torch.long)
    ar_mask = torch.zeros(B, N, tiles, dtype=torch.long)
    ar_mask[:, :, 0] = 1  # padding images keep their first tile "on", as the processor does
    cam = torch.zeros(B, seq_len, N, tiles, dtype=torch.long)
    for b, row in enumerate(rows):
        offset, n0 = 0, 0
        for sample in row:
            t = sample.tiled
            if t is not None:
                n = len(t.aspect_ratio_ids)
                pixel_values[b, n0 : n0 + n] = t.pixel_values
                ids[b, n0 : n0 + n] = t.aspect_ratio_ids
                ar_mask[b, n0 : n0 + n] = t.aspect_ratio_mask
                cam[b, offset : offset + len(sample), n0 : n0 + n] = t.cross_attention_mask
                n0 += n
            offset += len(sample)
    return {
        "pixel_values": pixel_values,
        "aspect_ratio_ids": ids,
        "aspect_ratio_mask": ar_mask,
        "cross_attention_mask": cam,
    }


# ---- the resumable loader ---------------------------------------------------------------------------


class ResumableLoader:
    """Global batches of `batch_size` rows from a seeded per-epoch order; this process's share split
    into `micro_batches` micro-batches. state_dict() is (epoch, rows consumed in the epoch)."""

    def __init__(
        self,
        rows: list[list[Sample]],
        seq_len: int,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        micro_batches: int = 1,
    ):
        if batch_size % (world_size * micro_batches):
            raise ConfigError(
                f"batch_size {batch_size} is not divisible by processes ({world_size}) x grad_accum ({micro_batches})"
            )
        self.rows, self.seq_len, self.batch_size, self.pad_id = rows, seq_len, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.rank, self.world_size, self.micro_batches = rank, world_size, micro_batches
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.rows)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next_global_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(out), len(self._order) - self.index)
            out += self._order[self.index : self.index + take]
            self.index += take
        return out

    def next_batch(self) -> list[dict]:
        """This process's micro-batches of the next global batch."""
        indices = self.next_global_indices()
        per_rank = self.batch_size // self.world_size
        mine = indices[self.rank * per_rank : (self.rank + 1) * per_rank]
        per_micro = per_rank // self.micro_batches
        return [
            collate_rows([self.rows[i] for i in mine[k : k + per_micro]], self.seq_len, self.pad_id)
            for k in range(0, per_rank, per_micro)
        ]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict):
        if state.get("num_rows") != len(self.rows) or state.get("seed") != self.seed:
            raise ConfigError(
                f"the checkpoint's data loader saw {state.get('num_rows')} rows with seed {state.get('seed')}, "
                f"but this run has {len(self.rows)} rows with seed {self.seed}: the data or config changed"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)
