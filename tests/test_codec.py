"""Audio codec: round-trip shapes, save/load, and EnCodec parity with transformers through load_codec."""

import json

import pytest
import torch

import omnilm
from omnilm.config import AudioCodecConfig
from omnilm.convert.codec import load_codec, save_codec
from omnilm.errors import CheckpointError, MediaError
from omnilm.models.vq.codec import AudioCodec, multi_resolution_stft_loss
from omnilm.training.codec import si_snr, synth_tones, train_audio_codec

transformers = pytest.importorskip("transformers")

TINY = AudioCodecConfig(sample_rate=8000, channels=8, strides=[2, 4], n_q=3, codebook_size=32, dim=16)


def test_codec_round_trip_shapes():
    torch.manual_seed(0)
    model = AudioCodec(TINY).eval()
    x = synth_tones(2, sample_rate=8000, seconds=0.05)  # 400 samples, hop 8
    x = x[..., :397]  # not a whole number of frames: the tail is padded
    codes = model.encode(x)
    assert codes.shape == (2, 3, 50) and codes.dtype == torch.int64
    assert int(codes.max()) < TINY.codebook_size
    audio = model.decode(codes)
    assert audio.shape == (2, 1, 400)
    assert model.encode(x, n_q=1).shape == (2, 1, 50)
    with pytest.raises(MediaError):
        model.decode(torch.full((1, 3, 4), TINY.codebook_size))
    with pytest.raises(MediaError):
        model.encode(torch.zeros(2, 400))


def test_codec_training_improves_si_snr_and_saves(tmp_path):
    clips = synth_tones(16, sample_rate=8000, seconds=0.05, seed=1)
    torch.manual_seed(0)
    before = si_snr(AudioCodec(TINY).eval().decode(AudioCodec(TINY).eval().encode(clips))[..., :400], clips)
    model, metrics = train_audio_codec(clips, TINY, steps=60, batch_size=8, lr=3e-3, device="cpu")
    assert metrics["si_snr"] > before + 3, (before, metrics)
    assert 0 < metrics["codebook_usage"] <= 100
    save_codec(model, tmp_path)
    again = load_codec(tmp_path)
    assert torch.equal(again.encode(clips), model.encode(clips))
    assert torch.allclose(again.decode(model.encode(clips)), model.decode(model.encode(clips)))


def test_stft_loss_and_si_snr_are_sensitive():
    x = synth_tones(2, sample_rate=8000, seconds=0.05)[:, 0]
    assert multi_resolution_stft_loss(x, x).item() < 1e-4
    assert multi_resolution_stft_loss(x + 0.05 * torch.randn_like(x), x).item() > 0.1
    assert si_snr(2 * x, x) > 60  # scale-invariant
    assert si_snr(x + 0.1 * torch.randn_like(x), x) < 20


def _tiny_encodec(tmp_path, causal=True, old_weight_norm=False, **kw):
    cfg = transformers.EncodecConfig(
        sampling_rate=800,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[4, 2],
        codebook_size=32,
        target_bandwidths=[1.5, 3.0],
        use_causal_conv=causal,
        num_lstm_layers=1,
        **kw,
    )
    torch.manual_seed(0)
    hf = transformers.EncodecModel(cfg).eval()
    with torch.no_grad():  # transformers initializes codebooks to zeros; real ones are not
        for layer in hf.quantizer.layers:
            layer.codebook.embed.normal_()
    hf.save_pretrained(tmp_path)
    if old_weight_norm:  # older checkpoints (e.g. facebook/encodec_24khz) store weight_g / weight_v
        from safetensors.torch import load_file, save_file

        state = load_file(tmp_path / "model.safetensors")
        state = {
            k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            ): v
            for k, v in state.items()
        }
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return hf


@pytest.mark.parametrize("causal,old", [(True, False), (False, True)])
def test_encodec_parity_with_transformers(tmp_path, causal, old):
    hf = _tiny_encodec(tmp_path, causal=causal, old_weight_norm=old)
    codec = omnilm.load_codec(tmp_path)  # the public entry point
    x = torch.randn(2, 1, 203, generator=torch.Generator().manual_seed(1))  # not a multiple of the hop (8)
    for bandwidth in (None, 3.0):
        with torch.no_grad():
            ref = hf.encode(x, bandwidth=bandwidth)
            ref_audio = hf.decode(ref.audio_codes, ref.audio_scales).audio_values
        codes = codec.encode(x, bandwidth=bandwidth)
        assert codes.shape == ref.audio_codes[0].shape  # (B, n_q, frames)
        assert torch.equal(codes, ref.audio_codes[0])
        audio = codec.decode(codes)
        assert audio.shape == ref_audio.shape
        assert (audio - ref_audio).abs().max().item() < 1e-4
    assert codec.encode(x).shape[1] == 3 and codec.encode(x, bandwidth=3.0).shape[1] == 6


def test_encodec_chunked_normalized_parity(tmp_path):
    # The 48 kHz model's layout: chunks with overlap, each normalized to unit RMS.
    hf = _tiny_encodec(tmp_path, normalize=True, chunk_length_s=0.1, overlap=0.5)
    codec = load_codec(tmp_path)
    x = 0.3 * torch.randn(1, 1, 160, generator=torch.Generator().manual_seed(2))  # 4 chunks of 80, stride 40
    with torch.no_grad():
        ref = hf.encode(x)
        ref_audio = hf(x).audio_values
    # transformers pads the short last chunk's codes to full length; OmniLM concatenates them unpadded.
    expected = torch.cat(list(ref.audio_codes), dim=-1)[..., : -ref.last_frame_pad_length or None]
    codes = codec.encode(x)
    assert torch.equal(codes, expected)
    audio = codec.decode(codes, scales=codec.last_scales)[..., : x.shape[-1]]
    assert (audio - ref_audio).abs().max().item() < 1e-4


def test_load_codec_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_codec(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="not a codec"):
        load_codec(tmp_path)
    _tiny_encodec(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pickle"):
        load_codec(tmp_path)
