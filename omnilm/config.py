"""Typed, nested model configs and the named presets.

Presets are looked up by exact name; each names the document it comes from. Derived values are
filled in `__post_init__`, and inconsistent values raise ConfigError there.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from .errors import ConfigError

_REGISTRY: dict[str, type] = {}


def register_config(cls):
    """Class decorator: lets a modality config sit in ModelConfig's `Any` fields and round-trip JSON."""
    _REGISTRY[cls.__name__] = cls
    return cls


@dataclass
class RopeScaling:
    """Llama-3 frequency scaling (rope_type "llama3" in Hugging Face configs)."""

    factor: float = 32.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class DecoderConfig:
    vocab_size: int = 2048
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None  # None: MHA; 1: MQA; otherwise GQA
    intermediate_size: int = 256
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_seq_len: int = 2048
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    use_rope: bool = True
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    attention_bias: bool = False
    qkv_bias: bool = False  # bias on q/k/v only, o_proj without (Qwen2); attention_bias sets all four
    mlp_bias: bool = False
    sliding_window: int | None = None  # keys a query sees in a "sliding_attention" layer (Qwen2, HF's rule)
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"; None: all full
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ConfigError(f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if (
            min(self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.intermediate_size)
            <= 0
        ):
            raise ConfigError("decoder sizes must be positive")
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            kinds = {"full_attention", "sliding_attention"}
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= kinds:
                raise ConfigError(
                    f"layer_types must list {self.num_layers} of {sorted(kinds)}, got {self.layer_types}"
                )
            if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
                raise ConfigError(
                    f"sliding_attention layers need a positive sliding_window, got {self.sliding_window}"
                )


# ---- modality configs: each path adds its dataclasses below its own marker (decorated @register_config) ----
# [vision configs]
VISION_ACTS = ("gelu_pytorch_tanh", "gelu", "quick_gelu")


@register_config
@dataclass
class VisionConfig:
    """A SigLIP or CLIP vision tower plus the projector that feeds the decoder (LLaVA's layout).

    feature_layer: None gives the tower's last_hidden_state as transformers defines it (SigLIP: after
    post_layernorm; CLIP: before it); an int (or list of ints, concatenated) indexes the hidden states
    the way LLaVA's vision_feature_layer does (0 = embeddings, -1 = last block, -2 = the one before).
    feature_select "default" drops the first token (LLaVA removes CLIP's CLS that way), "full" keeps all.
    """

    kind: str = "siglip"  # "siglip" | "clip"
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    use_head: bool = False  # SigLIP's attention-pooling head; kept so checkpoints load, unused by fusion
    feature_layer: int | list[int] | None = -1
    feature_select: str = "full"  # "full" | "default"
    pixel_shuffle: int = 1  # projector folds s x s patches into one token
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.kind not in ("siglip", "clip"):
            raise ConfigError(f"vision kind must be 'siglip' or 'clip', got {self.kind!r}")
        if self.hidden_act not in VISION_ACTS:
            raise ConfigError(f"vision hidden_act must be one of {VISION_ACTS}, got {self.hidden_act!r}")
        if self.projector_act != "gelu":
            raise ConfigError(f"vision projector_act must be 'gelu', got {self.projector_act!r}")
        if self.feature_select not in ("full", "default"):
            raise ConfigError(
                f"vision feature_select must be 'full' or 'default', got {self.feature_select!r}"
            )
        if (
            min(
                self.image_size,
                self.patch_size,
                self.hidden_size,
                self.num_layers,
                self.num_heads,
                self.pixel_shuffle,
            )
            <= 0
        ):
            raise ConfigError("vision sizes must be positive")
        if self.image_size < self.patch_size:
            raise ConfigError(
                f"vision image_size {self.image_size} is smaller than patch_size {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        for layer in self.feature_layers:
            if not -(self.num_layers + 1) <= layer <= self.num_layers:
                raise ConfigError(
                    f"vision feature_layer {layer} is out of range for {self.num_layers} layers"
                )
        side = self.image_size // self.patch_size
        if self.pixel_shuffle > 1:
            if self.n_features != side * side:
                raise ConfigError(
                    f"vision pixel_shuffle needs a square patch grid; {self.kind} with feature_select "
                    f"{self.feature_select!r} gives {self.n_features} tokens"
                )
            if side % self.pixel_shuffle:
                raise ConfigError(
                    f"vision patch grid {side}x{side} is not divisible by pixel_shuffle {self.pixel_shuffle}"
                )

    @property
    def feature_layers(self) -> list[int]:
        if self.feature_layer is None:
            return []
        return [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)

    @property
    def num_patches(self) -> int:
        # the patch conv floors: SigLIP-so400m's 384 px / patch 14 gives a 27 x 27 grid
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_features(self) -> int:
        """Tokens per image out of the tower, after feature selection (CLIP adds a CLS token)."""
        n = self.num_patches + (1 if self.kind == "clip" else 0)
        return n - 1 if self.feature_select == "default" else n

    @property
    def feature_dim(self) -> int:
        return self.hidden_size * max(1, len(self.feature_layers))

    @property
    def tokens_per_image(self) -> int:
        """Placeholders the processor puts in the prompt per image: features after the pixel shuffle."""
        return self.n_features // self.pixel_shuffle**2


# [audio configs]


@register_config
@dataclass
class AudioConfig:
    """An audio encoder (Whisper-style log-mel or wav2vec2-style raw waveform) and its frame-stack projector.

    Names follow the Hugging Face configs where they exist. Audio is encoded in fixed windows of
    `window_seconds`, so each window gives a known number of decoder tokens (`tokens_per_window`).
    """

    kind: str = "whisper"  # "whisper" | "wav2vec2"
    hidden_size: int = 64  # Whisper d_model
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    layer_norm_eps: float = 1e-5
    activation: str = "gelu"  # "gelu" (exact) | "gelu_new" (tanh approximation)
    # Whisper log-mel front end and positions
    num_mel_bins: int = 80  # 80 (Whisper up to large-v2) or 128 (large-v3)
    max_source_positions: int = 1500  # encoder frames of a 30 s window (3000 mel frames / conv stride 2)
    n_fft: int = 400
    hop_length: int = 160
    # wav2vec2 conv feature extractor and convolutional position embedding (base defaults)
    conv_dim: list[int] = field(default_factory=lambda: [512] * 7)
    conv_kernel: list[int] = field(default_factory=lambda: [10, 3, 3, 3, 3, 2, 2])
    conv_stride: list[int] = field(default_factory=lambda: [5, 2, 2, 2, 2, 2, 2])
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    feat_extract_norm: str = (
        "group"  # "group": GroupNorm on the first conv only; "layer": LayerNorm on every conv
    )
    do_stable_layer_norm: bool = False  # pre-norm encoder layers (wav2vec2 large-lv60 style)
    # both
    sampling_rate: int = 16000
    window_seconds: float = 30.0
    projector_stack: int = 4  # adjacent encoder frames folded into one decoder token

    def __post_init__(self):
        if self.kind not in ("whisper", "wav2vec2", "qwen2_audio"):
            raise ConfigError(f"audio kind must be 'whisper', 'wav2vec2' or 'qwen2_audio', got {self.kind!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"audio hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.activation not in ("gelu", "gelu_new"):
            raise ConfigError(f"audio activation must be 'gelu' or 'gelu_new', got {self.activation!r}")
        if self.feat_extract_norm not in ("group", "layer"):
            raise ConfigError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if not (len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride)) or not self.conv_dim:
            raise ConfigError(
                f"conv_dim, conv_kernel and conv_stride must have one equal, non-zero length, got "
                f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}"
            )
        if self.projector_stack < 1 or self.window_seconds <= 0 or self.sampling_rate <= 0:
            raise ConfigError("projector_stack, window_seconds and sampling_rate must be positive")
        if self.samples_per_window != self.window_seconds * self.sampling_rate:
            raise ConfigError(
                f"window_seconds {self.window_seconds} x sampling_rate {self.sampling_rate} is not a whole "
                "number of samples"
            )
        if self.kind != "wav2vec2" and self.frames_per_window > self.max_source_positions:
            raise ConfigError(
                f"a {self.window_seconds} s window gives {self.frames_per_window} encoder frames but "
                f"max_source_positions is {self.max_source_positions}"
            )
        if self.tokens_per_window < 1:
            raise ConfigError(
                f"a {self.window_seconds} s window gives {self.frames_per_window} encoder frames, fewer than "
                f"projector_stack {self.projector_stack}"
            )

    @property
    def samples_per_window(self) -> int:
        return int(round(self.window_seconds * self.sampling_rate))

    @property
    def frames_per_window(self) -> int:
        """Encoder output frames for one window (after the encoder's own downsampling)."""
        if self.kind != "wav2vec2":
            mel_frames = self.samples_per_window // self.hop_length  # 480000 / 160 = 3000
            frames = (mel_frames - 1) // 2 + 1  # conv2: kernel 3, stride 2, padding 1
            # qwen2_audio: the average pool (kernel 2, stride 2) after the layers, 1500 -> 750
            return (frames - 2) // 2 + 1 if self.kind == "qwen2_audio" else frames
        n = self.samples_per_window
        for k, s in zip(self.conv_kernel, self.conv_stride):
            n = (n - k) // s + 1 if n >= k else 0
        return n

    @property
    def tokens_per_window(self) -> int:
        """Decoder tokens (placeholders) one window becomes after the frame-stack projector."""
        return self.frames_per_window // self.projector_stack


# [discrete configs]


@register_config
@dataclass
class DiscreteConfig:
    """Early fusion (omnilm/models/discrete.py): one vocabulary laid out [text | image codes | audio codes].

    Ids [0, text_vocab_size) are text (the decoder's own table and lm_head), then image_vocab_size VQ
    codes from image_offset, then audio_vocab_size codec codes from audio_offset; each modality has its
    own embedding table and output head, and a learned modality embedding is added at every position.
    An image is image_grid^2 codes in row-major order between the text tokens image_start_id and
    image_end_id; an audio span is audio_frames codec frames, each frame's audio_codebooks residual
    codes consecutive (level 0 first), between audio_start_id and audio_end_id. The marker defaults
    are the ids of OmniLM's default tokenizer (omnilm/tokenizers/text.py).
    """

    text_vocab_size: int = 2048  # must equal decoder.vocab_size
    image_vocab_size: int = 512  # the VQ codebook size; 0: no image modality
    audio_vocab_size: int = 0  # the codec codebook size; 0: no audio modality
    image_grid: int = 8  # codes per side of the VQ grid (ImageVQConfig.grid_size)
    audio_codebooks: int = 1  # residual codebooks per codec frame (AudioCodecConfig.n_q)
    audio_frames: int = 0  # codec frames per audio span
    image_start_id: int = 8
    image_end_id: int = 9
    audio_start_id: int = 10
    audio_end_id: int = 11
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    audio_loss_weight: float = 1.0
    image_tokenizer: typing.Any = (
        None  # optional ImageVQConfig the codes come from (checked against the sizes)
    )
    audio_tokenizer: typing.Any = None  # optional AudioCodecConfig
    image_offset: int | None = None  # derived: text_vocab_size
    audio_offset: int | None = None  # derived: image_offset + image_vocab_size

    def __post_init__(self):
        if isinstance(self.image_tokenizer, dict):
            self.image_tokenizer = from_dict(ImageVQConfig, self.image_tokenizer)
        if isinstance(self.audio_tokenizer, dict):
            self.audio_tokenizer = from_dict(AudioCodecConfig, self.audio_tokenizer)
        if self.text_vocab_size <= 0 or min(self.image_vocab_size, self.audio_vocab_size) < 0:
            raise ConfigError("DiscreteConfig vocab sizes must be positive (text) or >= 0 (image, audio)")
        if self.image_vocab_size and self.image_grid <= 0:
            raise ConfigError(f"DiscreteConfig.image_grid must be positive, got {self.image_grid}")
        if self.audio_vocab_size and (self.audio_codebooks <= 0 or self.audio_frames <= 0):
            raise ConfigError(
                f"DiscreteConfig with audio needs positive audio_codebooks and audio_frames, got "
                f"{self.audio_codebooks} and {self.audio_frames}"
            )
        for name in ("image_start_id", "image_end_id", "audio_start_id", "audio_end_id"):
            if not 0 <= getattr(self, name) < self.text_vocab_size:
                raise ConfigError(
                    f"DiscreteConfig.{name} {getattr(self, name)} is not a text id "
                    f"(text_vocab_size {self.text_vocab_size})"
                )
        if min(self.text_loss_weight, self.image_loss_weight, self.audio_loss_weight) < 0:
            raise ConfigError("DiscreteConfig loss weights must be >= 0")
        vq = self.image_tokenizer
        if vq is not None and (vq.codebook_size != self.image_vocab_size or vq.grid_size != self.image_grid):
            raise ConfigError(
                f"DiscreteConfig image_vocab_size {self.image_vocab_size} / image_grid {self.image_grid} "
                f"do not match the image tokenizer's codebook_size {vq.codebook_size} / grid_size "
                f"{vq.grid_size}"
            )
        codec = self.audio_tokenizer
        if codec is not None and (
            codec.codebook_size != self.audio_vocab_size or codec.n_q != self.audio_codebooks
        ):
            raise ConfigError(
                f"DiscreteConfig audio_vocab_size {self.audio_vocab_size} / audio_codebooks "
                f"{self.audio_codebooks} do not match the audio codec's codebook_size "
                f"{codec.codebook_size} / n_q {codec.n_q}"
            )
        self.image_offset = self.text_vocab_size
        self.audio_offset = self.image_offset + self.image_vocab_size

    @property
    def vocab_size(self) -> int:
        """The whole concatenated vocabulary the model's logits cover."""
        return self.audio_offset + self.audio_vocab_size

    @property
    def tokens_per_image(self) -> int:
        return self.image_grid * self.image_grid if self.image_vocab_size else 0

    @property
    def tokens_per_audio(self) -> int:
        return self.audio_frames * self.audio_codebooks if self.audio_vocab_size else 0


@register_config
@dataclass
class ImageVQConfig:
    """VQ-VAE image tokenizer (omnilm/models/vq/image_vqvae.py): image_size^2 pixels -> grid_size^2 codes."""

    image_size: int = 32
    in_channels: int = 3
    channels: int = 64  # width of the first conv stage; doubles at each downsampling
    num_res_blocks: int = 1
    downsample: int = 4  # pixels per code along each side; a power of 2
    codebook_size: int = 512
    code_dim: int = 64
    ema_decay: float = 0.99
    commitment_beta: float = 0.25  # VQ-VAE (van den Oord et al. 2017) uses 0.25
    dead_code_threshold: float = 1.0  # EMA hits per step below which a code is re-seeded from the batch
    grid_size: int | None = None  # derived: image_size // downsample

    def __post_init__(self):
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ConfigError(f"ImageVQConfig.downsample must be a power of 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ConfigError(
                f"ImageVQConfig.image_size {self.image_size} is not divisible by downsample {self.downsample}"
            )
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ImageVQConfig.ema_decay must be in (0, 1), got {self.ema_decay}")
        if min(self.channels, self.codebook_size, self.code_dim, self.in_channels) <= 0:
            raise ConfigError("ImageVQConfig sizes must be positive")
        self.grid_size = self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid_size * self.grid_size


@register_config
@dataclass
class AudioCodecConfig:
    """SEANet-style waveform codec with residual VQ (omnilm/models/vq/codec.py): hop samples -> n_q codes."""

    sample_rate: int = 16000
    channels: int = 32  # width of the first conv stage; doubles at each downsampling
    strides: list[int] = field(default_factory=lambda: [2, 4, 5])  # hop = prod(strides) = 40 samples
    n_q: int = 4
    codebook_size: int = 256
    dim: int = 64
    ema_decay: float = 0.99
    commitment_beta: float = 0.25
    dead_code_threshold: float = 1.0

    def __post_init__(self):
        self.strides = list(self.strides)
        if not self.strides or min(self.strides) < 1:
            raise ConfigError(f"AudioCodecConfig.strides must be positive integers, got {self.strides}")
        if min(self.sample_rate, self.channels, self.n_q, self.codebook_size, self.dim) <= 0:
            raise ConfigError("AudioCodecConfig sizes must be positive")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"AudioCodecConfig.ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def hop_length(self) -> int:
        hop = 1
        for s in self.strides:
            hop *= s
        return hop


# [cross-attention configs]


def all_aspect_ratios(max_num_tiles: int) -> list[list[int]]:
    """Tile grids (rows, cols) with at most max_num_tiles tiles, in transformers' order (aspect ratio id - 1)."""
    return [
        [a, b]
        for a in range(1, max_num_tiles + 1)
        for b in range(1, max_num_tiles + 1)
        if a * b <= max_num_tiles
    ]


@register_config
@dataclass
class MllamaVisionConfig:
    """The tiled vision encoder of Llama-3.2-Vision (omnilm/models/mllama_vision.py); names follow
    transformers' MllamaVisionConfig. An image is resized onto a canvas of up to max_num_tiles square
    tiles of image_size pixels; each tile gives num_patches tokens (a class token plus the patch grid)."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_global_layers: int = 8
    num_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    max_num_tiles: int = 4
    intermediate_layers_indices: list[int] = field(default_factory=lambda: [3, 7, 15, 23, 30])
    supported_aspect_ratios: list[list[int]] | None = None  # None: every grid of <= max_num_tiles tiles

    def __post_init__(self):
        if self.supported_aspect_ratios is None:
            self.supported_aspect_ratios = all_aspect_ratios(self.max_num_tiles)
        self.supported_aspect_ratios = [list(r) for r in self.supported_aspect_ratios]
        if self.hidden_act != "gelu":
            raise ConfigError(f"mllama vision hidden_act must be 'gelu', got {self.hidden_act!r}")
        if min(self.hidden_size, self.num_layers, self.num_heads, self.max_num_tiles, self.patch_size) <= 0:
            raise ConfigError("mllama vision sizes must be positive")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"mllama vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"mllama vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_patches % 8 == 0:
            # transformers pads each tile to a multiple of 8 tokens and masks the padding with a slice
            # `[-pad:]` that masks everything when pad == 0; real checkpoints have 1025 tokens a tile
            raise ConfigError(
                f"mllama vision tiles of {self.num_patches} tokens (a multiple of 8) are not supported"
            )
        for i in self.intermediate_layers_indices:
            if not 0 <= i < self.num_layers:
                raise ConfigError(
                    f"mllama vision intermediate layer {i} is out of range for {self.num_layers} layers"
                )
        for r in self.supported_aspect_ratios:
            if len(r) != 2 or min(r) < 1 or r[0] * r[1] > self.max_num_tiles:
                raise ConfigError(
                    f"mllama vision aspect ratio {r} is not a grid of at most {self.max_num_tiles} tiles"
                )

    @property
    def num_patches(self) -> int:
        """Tokens per tile: the patch grid plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        """Feature width out of the tower: the last layer and each intermediate layer, concatenated."""
        return self.hidden_size * (1 + len(self.intermediate_layers_indices))

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


@register_config
@dataclass
class CrossAttentionConfig:
    """Gated cross-attention fusion (omnilm/models/mllama.py, Llama-3.2-Vision style): the decoder
    layers at `layers` (indices into decoder.num_layers, which counts them) attend to projected
    vision features instead of to the text; each has tanh gates on its attention and MLP branches."""

    layers: list[int] = field(default_factory=list)
    vision: typing.Any = None  # MllamaVisionConfig, or a VisionConfig (one tile per image; `omnilm compose`)
    image_token_id: int | None = None  # <|image|>: an ordinary embedded token that marks where an image is
    extra_embeddings: int = 0  # rows of embed_tokens past vocab_size (Mllama: 8 special tokens)

    def __post_init__(self):
        if isinstance(self.vision, dict):  # untagged: the Mllama tower
            self.vision = from_dict(MllamaVisionConfig, self.vision)
        if not self.layers:
            raise ConfigError("cross_attention.layers must name at least one decoder layer")
        if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
            raise ConfigError(f"cross_attention.layers must be distinct indices >= 0, got {self.layers}")
        if not isinstance(self.vision, (MllamaVisionConfig, VisionConfig)):
            raise ConfigError(
                "cross_attention.vision must be an MllamaVisionConfig (tiled) or a VisionConfig (SigLIP/CLIP)"
            )
        if self.extra_embeddings < 0:
            raise ConfigError("cross_attention.extra_embeddings must be >= 0")


# [training configs]


@dataclass
class ModelConfig:
    """A whole OmniLM model: the decoder plus optional encoders, projectors and discrete heads.

    `vision`, `audio` and `discrete` are filled by the modality paths (see their modules); a text-only
    model leaves them None.
    """

    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: typing.Any = None
    audio: typing.Any = None
    discrete: typing.Any = None
    cross_attention: typing.Any = None  # CrossAttentionConfig: gated cross-attention fusion (Mllama)
    image_token_id: int | None = None  # placeholder id the processor expands for each image
    audio_token_id: int | None = None
    source: str = ""  # where the preset's numbers come from

    @property
    def hf_format(self) -> str:
        """How save_pretrained writes this model, a function of the config alone: "llama" (a plain
        decoder), "llava" (plus a LLaVA-shaped vision tower), else "omnilm" (OmniLM's own format)."""
        if self.cross_attention is not None:  # Llama-3.2-Vision's layout, if its tower is the tiled one
            return "mllama" if isinstance(self.cross_attention.vision, MllamaVisionConfig) else "omnilm"
        if self.audio is None and self.discrete is None:
            if self.vision is None:
                return "qwen2" if self.decoder.qkv_bias else "llama"
            if self.vision.pixel_shuffle == 1 and self.vision.feature_layer is not None:
                return "llava"
        return "omnilm"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return from_dict(cls, d)


def from_dict(cls, d):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys (ConfigError)."""
    if d is None or not dataclasses.is_dataclass(cls):
        return d
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(hints[name], value, name)
    return cls(**kwargs)


def _coerce(tp, value, name):
    if value is None:
        return None
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value)
        return value
    if tp is typing.Any and isinstance(value, dict) and "__type__" in value:
        sub = _REGISTRY.get(value["__type__"])
        if sub is None:
            raise ConfigError(f"unknown config type {value['__type__']!r} for {name}")
        return from_dict(sub, {k: v for k, v in value.items() if k != "__type__"})
    return value


def config_to_dict(cfg) -> dict:
    """Like dataclasses.asdict, but tags registered sub-configs with their type for from_dict."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            d = config_to_dict(v)
            if type(v).__name__ in _REGISTRY:
                d["__type__"] = type(v).__name__
            v = d
        out[f.name] = v
    return out


ModelConfig.to_dict = lambda self: config_to_dict(self)


# ---- presets --------------------------------------------------------------------------------------

LLAMA3_ROPE_1B = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
LLAMA3_ROPE_8B = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def _tiny():
    # Tests and the CPU toy: small enough to train in seconds, vocab of the embedded default tokenizer.
    # Its head_dim is 16 (64 / 4): transformers loads its exports, vLLM's CPU attention (head_dim >= 32)
    # does not; a model meant to be served there needs head_dim 32+ (scripts/test_vllm.py uses 32).
    return ModelConfig(
        decoder=DecoderConfig(
            vocab_size=2048,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=192,
            max_seq_len=1024,
            rope_theta=10000.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        source="OmniLM test preset (no external source)",
    )


def _llama(hidden, layers, heads, kv, ffn, head_dim, rope, tie, source):
    return ModelConfig(
        decoder=DecoderConfig(
            vocab_size=128256,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            intermediate_size=ffn,
            head_dim=head_dim,
            max_seq_len=131072,
            rope_theta=500000.0,
            rope_scaling=rope,
            tie_embeddings=tie,
            norm_eps=1e-5,
            bos_token_id=128000,
            eos_token_id=[128001, 128008, 128009],
        ),
        source=source,
    )


def _qwen25(hidden, layers, heads, kv, ffn, tie, vocab, max_pos, source):
    # Qwen2.5 base configs: q/k/v bias, rope theta 1e6, RMSNorm eps 1e-6, sliding window off
    return ModelConfig(
        decoder=DecoderConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            intermediate_size=ffn,
            max_seq_len=max_pos,
            rope_theta=1000000.0,
            tie_embeddings=tie,
            qkv_bias=True,
            norm_eps=1e-6,
            bos_token_id=151643,
            eos_token_id=151643,
        ),
        source=source,
    )


def _llama_vision(source):
    cfg = _llama(4096, 40, 32, 8, 14336, 128, LLAMA3_ROPE_8B, False, source)
    cfg.decoder.eos_token_id, cfg.decoder.pad_token_id = 128001, 128004
    cfg.cross_attention = CrossAttentionConfig(
        layers=[3, 8, 13, 18, 23, 28, 33, 38],
        vision=MllamaVisionConfig(image_size=560, patch_size=14, max_num_tiles=4),
        image_token_id=128256,
        extra_embeddings=8,
    )
    return cfg


PRESETS = {
    "tiny": _tiny,
    # meta-llama/Llama-3.2-1B config.json (https://huggingface.co/meta-llama/Llama-3.2-1B); seed 004
    "llama-3.2-1b": lambda: _llama(
        2048,
        16,
        32,
        8,
        8192,
        64,
        LLAMA3_ROPE_1B,
        True,
        "https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json",
    ),
    # meta-llama/Llama-3.2-3B config.json
    "llama-3.2-3b": lambda: _llama(
        3072,
        28,
        24,
        8,
        8192,
        128,
        LLAMA3_ROPE_1B,
        True,
        "https://huggingface.co/meta-llama/Llama-3.2-3B/blob/main/config.json",
    ),
    # meta-llama/Llama-3.1-8B config.json
    "llama-3.1-8b": lambda: _llama(
        4096,
        32,
        32,
        8,
        14336,
        128,
        LLAMA3_ROPE_8B,
        False,
        "https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json",
    ),
    # Qwen/Qwen2.5-*B config.json files (https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json, ...)
    "qwen2.5-0.5b": lambda: _qwen25(
        896,
        24,
        14,
        2,
        4864,
        True,
        151936,
        32768,
        "https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json",
    ),
    "qwen2.5-1.5b": lambda: _qwen25(
        1536,
        28,
        12,
        2,
        8960,
        True,
        151936,
        131072,
        "https://huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json",
    ),
    "qwen2.5-3b": lambda: _qwen25(
        2048,
        36,
        16,
        2,
        11008,
        True,
        151936,
        32768,
        "https://huggingface.co/Qwen/Qwen2.5-3B/blob/main/config.json",
    ),
    "qwen2.5-7b": lambda: _qwen25(
        3584,
        28,
        28,
        4,
        18944,
        False,
        152064,
        131072,
        "https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json",
    ),
    # meta-llama/Llama-3.2-11B-Vision config.json: a Llama-3.1-8B-shaped text model with 8 gated
    # cross-attention layers among its 40, 560-px tiles (up to 4) through a 32 + 8 layer vision encoder
    "llama-3.2-11b-vision": lambda: _llama_vision(
        "https://huggingface.co/meta-llama/Llama-3.2-11B-Vision/blob/main/config.json"
    ),
    # The unified discrete-token transformer (seeds/002): hidden 4096, 36 layers, 32 heads, FFN 16384,
    # pre-LayerNorm, GELU FFN, RoPE, text vocab 50257 (+ image 16384 and audio 1024 codes, added by the
    # discrete path), max sequence 4096.
    "unified-8b": lambda: ModelConfig(
        decoder=DecoderConfig(
            vocab_size=50261,
            hidden_size=4096,
            num_layers=36,
            num_heads=32,
            intermediate_size=16384,
            max_seq_len=4096,
            norm="layernorm",
            mlp="gelu",
            rope_theta=10000.0,
            tie_embeddings=False,
        ),
        # text ids: GPT-2's 50257 plus the four span markers at 50257..50260; an image is a 32 x 32 VQ
        # grid (1,024 tokens); audio spans are 5 s of a 75 Hz codec (EnCodec 24 kHz) with 4 codebooks
        discrete=DiscreteConfig(
            text_vocab_size=50261,
            image_vocab_size=16384,
            image_grid=32,
            audio_vocab_size=1024,
            audio_codebooks=4,
            audio_frames=375,
            image_start_id=50257,
            image_end_id=50258,
            audio_start_id=50259,
            audio_end_id=50260,
        ),
        source="seeds/002 (unified discrete-token transformer, ~8B)",
    ),
    # The 88B design (seeds/001): L=110, D=8192, H=64 (head_dim 128), multi-query attention, ~50k BPE
    # vocabulary (GPT-2's 50257), 8192-token sequences. With MQA a 4*D GELU FFN counts only 74.9B, so
    # the FFN is SwiGLU of width 26624 (3.25*D, a multiple of 256), which makes the name true: 87.79B.
    "design-88b": lambda: ModelConfig(
        decoder=DecoderConfig(
            vocab_size=50257,
            hidden_size=8192,
            num_layers=110,
            num_heads=64,
            num_kv_heads=1,
            intermediate_size=26624,
            max_seq_len=8192,
            mlp="swiglu",
            rope_theta=10000.0,
            tie_embeddings=False,
        ),
        source="seeds/001 (the 88B multimodal design; SwiGLU width 26624 = 3.25*D so MQA totals 87.79B)",
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None
