"""Audio front end and encoders against transformers, through the converter production uses."""

import json

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model, WhisperConfig, WhisperFeatureExtractor, WhisperModel

from omnilm.config import AudioConfig, DecoderConfig, ModelConfig
from omnilm.convert.audio import audio_config_from_hf, audio_tower_state_from_hf, load_audio_encoder
from omnilm.convert.hf import read_config, read_state_dict
from omnilm.errors import CheckpointError, ConfigError
from omnilm.models.audio import LogMel, build_audio_projector, build_audio_tower, mel_filter_bank

SR = 16000


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """A gliding chirp with harmonics, a tone and noise, amplitude-modulated like syllables."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 80 * np.sin(2 * np.pi * 0.7 * t)  # pitch contour
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t) ** 2
    x = 0.3 * envelope * voice + 0.1 * np.sin(2 * np.pi * 1000 * t) + 0.02 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def chirp(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * (100 * t + 400 * t**2))).astype(np.float32)  # 100 Hz -> ~8 kHz sweep


# ---- log-mel --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_transformers(n_mels):
    ref = WhisperFeatureExtractor(feature_size=n_mels).mel_filters
    assert np.abs(mel_filter_bank(n_mels) - ref).max() < 1e-12


@pytest.mark.parametrize("n_mels", [80, 128])
def test_logmel_equals_whisper_feature_extractor(n_mels):
    clips = [
        speech_like(7.3, seed=1),
        chirp(12.0),
        speech_like(31.0, seed=2),
    ]  # short, medium, longer than 30 s
    ref = WhisperFeatureExtractor(feature_size=n_mels)(clips, sampling_rate=SR, return_tensors="np")[
        "input_features"
    ]
    ours = LogMel(n_mels)(
        torch.nn.utils.rnn.pad_sequence([torch.from_numpy(c) for c in clips], batch_first=True)
    )
    assert ours.shape == (3, n_mels, 3000)
    assert ref.std() > 0.1  # real signals, not a floor of silence
    assert np.abs(ours.numpy() - ref).max() <= 1e-4


def test_logmel_floor_is_per_clip():
    loud, quiet = speech_like(3.0), 1e-3 * speech_like(3.0, seed=3)
    batch = LogMel(80)(torch.stack([torch.from_numpy(loud), torch.from_numpy(quiet)]))
    single = LogMel(80)(torch.from_numpy(quiet)[None])
    assert torch.allclose(
        batch[1], single[0], atol=1e-6
    )  # the loud clip's max does not set the quiet one's floor


# ---- Whisper encoder ----------------------------------------------------------------------------------------


def tiny_whisper(tmp_path, n_mels=80):
    hf = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=n_mels,
        max_source_positions=1500,
        vocab_size=100,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    model = WhisperModel(hf).eval()
    with torch.no_grad():  # random, non-zero biases and norms so every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_encoder_equals_transformers(tmp_path, n_mels):
    ref = tiny_whisper(tmp_path, n_mels)
    clips = [speech_like(9.0), chirp(30.0)]
    feats = torch.from_numpy(
        WhisperFeatureExtractor(feature_size=n_mels)(clips, sampling_rate=SR, return_tensors="np")[
            "input_features"
        ]
    )
    enc = load_audio_encoder(tmp_path, read_config(tmp_path))
    assert enc.config.kind == "whisper" and enc.config.num_mel_bins == n_mels
    with torch.no_grad():
        ours, theirs = enc(feats), ref.encoder(feats).last_hidden_state
    assert ours.shape == (2, 1500, 32)
    assert (ours - theirs).abs().max() <= 1e-4


def test_whisper_converter_drops_decoder_but_rejects_unknown_keys(tmp_path):
    tiny_whisper(tmp_path)
    hf = read_config(tmp_path)
    state = read_state_dict(tmp_path)
    assert any(k.startswith("decoder.") for k in state)
    mapped = audio_tower_state_from_hf(state, hf)
    assert mapped and all(k.startswith("audio_tower.") for k in mapped)
    assert not any("decoder" in k for k in mapped)
    state["encoder.extra.weight"] = torch.zeros(1)
    from omnilm.convert.hf import load_strict

    with pytest.raises(CheckpointError, match="extra"):
        load_strict(
            build_audio_tower(audio_config_from_hf(hf)),
            {k.removeprefix("audio_tower."): v for k, v in audio_tower_state_from_hf(state, hf).items()},
        )


# ---- wav2vec2 encoder ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stable", [False, True])
def test_wav2vec2_encoder_equals_transformers(tmp_path, stable):
    hf = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=[16, 16, 16],
        conv_kernel=[10, 3, 3],
        conv_stride=[5, 2, 2],
        conv_bias=stable,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=10,
        do_stable_layer_norm=stable,
        feat_extract_norm="layer" if stable else "group",
    )
    ref = Wav2Vec2Model(hf).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    x = torch.from_numpy(np.stack([speech_like(0.5), chirp(0.5)]))
    enc = load_audio_encoder(tmp_path, read_config(tmp_path))
    with torch.no_grad():
        ours, theirs = enc(x), ref(x).last_hidden_state
    assert ours.shape == theirs.shape == (2, 399, 32)
    assert (ours - theirs).abs().max() <= 1e-4


def test_wav2vec2_old_weight_norm_names(tmp_path):
    hf = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=[16, 16],
        conv_kernel=[10, 3],
        conv_stride=[5, 2],
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=10,
    )
    ref = Wav2Vec2Model(hf).eval()
    ref.save_pretrained(tmp_path)
    state = read_state_dict(tmp_path)
    renamed = {
        k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        ): v
        for k, v in state.items()
    }
    assert renamed.keys() != state.keys()
    a = audio_tower_state_from_hf(state, read_config(tmp_path))
    b = audio_tower_state_from_hf(renamed, read_config(tmp_path))
    assert a.keys() == b.keys() and "audio_tower.encoder.pos_conv_embed.conv.weight_g" in a


# ---- config, projector and composition ------------------------------------------------------------------


def test_tokens_per_window_matches_encoder_and_projector():
    for cfg in (
        AudioConfig(kind="whisper", hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32),
        AudioConfig(
            kind="wav2vec2",
            hidden_size=16,
            num_heads=2,
            num_layers=1,
            intermediate_size=32,
            conv_dim=[8, 8],
            conv_kernel=[10, 3],
            conv_stride=[5, 2],
            num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=2,
            window_seconds=1.0,
        ),
    ):
        tower, proj = build_audio_tower(cfg).eval(), build_audio_projector(cfg, 24)
        if cfg.kind == "whisper":
            x = LogMel(80)(torch.from_numpy(speech_like(2.0))[None])
        else:
            x = torch.from_numpy(speech_like(1.0))[None]
        with torch.no_grad():
            out = proj(tower(x))
        assert out.shape == (1, cfg.tokens_per_window, 24)
    assert AudioConfig().tokens_per_window == 375  # 30 s -> 1500 frames -> 375 tokens at stack 4


def test_audio_config_round_trip_and_validation():
    cfg = ModelConfig(audio=AudioConfig(kind="wav2vec2", projector_stack=2), audio_token_id=5)
    back = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.audio == cfg.audio and back.audio.tokens_per_window == 749
    with pytest.raises(ConfigError, match="kind"):
        AudioConfig(kind="hubert")
    with pytest.raises(ConfigError, match="max_source_positions"):
        AudioConfig(window_seconds=60.0)
    with pytest.raises(CheckpointError, match="model_type"):
        audio_config_from_hf({"model_type": "llama"})


def test_composed_model_takes_audio_at_placeholders(tmp_path):
    from omnilm.models.omni import OmniModel

    tiny_whisper(tmp_path)
    hf = read_config(tmp_path)
    audio = audio_config_from_hf(hf)
    cfg = ModelConfig(
        decoder=DecoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
        audio=audio,
        audio_token_id=63,
    )
    model = OmniModel(cfg).eval()
    model.audio_tower.load_state_dict(
        {
            k.removeprefix("audio_tower."): v
            for k, v in audio_tower_state_from_hf(read_state_dict(tmp_path), hf).items()
        }
    )
    n = audio.tokens_per_window
    ids = torch.tensor([[1, 2] + [63] * n + [3] + [63] * n + [4]])  # two clips, one window each
    feats = LogMel(80)(torch.from_numpy(np.stack([speech_like(4.0), chirp(4.0)])))
    with torch.no_grad():
        logits = model(input_ids=ids, input_features=feats).logits
        swapped = model(input_ids=ids, input_features=feats.flip(0)).logits
    assert logits.shape == (1, ids.shape[1], 64)
    assert not torch.allclose(logits[0, -1], swapped[0, -1])  # each clip lands at its own placeholders
    with pytest.raises(ConfigError, match="placeholder"):
        model(input_ids=ids[:, :-2], input_features=feats)
