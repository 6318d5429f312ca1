"""Vector quantizers and the image VQ-VAE: EMA updates, dead-code restarts, residual VQ, real-image training."""

import numpy as np
import pytest
import torch

from omnilm.config import ImageVQConfig
from omnilm.convert.codec import load_codec, save_codec
from omnilm.errors import ConfigError, MediaError
from omnilm.models.vq.image_vqvae import ImageVQVAE
from omnilm.models.vq.quantizers import ResidualVQ, VectorQuantizer
from omnilm.tokenizers.vq import demo_images
from omnilm.training.codec import evaluate_image_vq, train_image_vq


def _clusters(n=512, dim=8, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(k, dim, generator=g)
    return centers[torch.randint(0, k, (n,), generator=g)] + 0.1 * torch.randn(n, dim, generator=g)


def test_ema_update_moves_codebook_toward_data():
    torch.manual_seed(0)
    # No data seeding and no restarts: only the EMA updates can move the random codebook.
    vq = VectorQuantizer(16, 8, decay=0.9, dead_code_threshold=0.0).train()
    vq.initialized.fill_(True)
    x = _clusters()
    before = vq.embed.clone()
    err_before = (x - vq.lookup(vq.quantize(x))).pow(2).mean()
    for _ in range(20):
        out = vq(x)
    assert not torch.equal(vq.embed, before)
    assert (x - vq.lookup(vq.quantize(x))).pow(2).mean() < 0.5 * err_before
    # Straight-through: the output has the codes' value and passes gradients to the input unchanged.
    x_req = x.clone().requires_grad_()
    out = vq.eval()(x_req)
    assert torch.allclose(out.quantized, vq.lookup(out.codes))
    out.quantized.sum().backward()
    assert torch.equal(x_req.grad, torch.ones_like(x))
    assert out.loss.item() > 0  # commitment


def test_eval_mode_leaves_codebook_alone():
    vq = VectorQuantizer(16, 8).eval()
    before = vq.embed.clone()
    vq(_clusters())
    assert torch.equal(vq.embed, before)


def test_dead_codes_are_restarted_from_batch():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 8, decay=0.5, dead_code_threshold=1.0).train()
    x = _clusters(k=4)
    vq(x)
    # Park half the codes far from any data: they never win, their counts decay, and they get re-seeded.
    vq.embed[16:] = 1000.0
    vq.embed_avg[16:] = 1000.0
    vq.cluster_size[16:] = 0.0
    n = vq.restart_dead_codes(x)
    assert n >= 16
    assert vq.embed.abs().max() < 100  # every code now sits among the encodings
    dists = torch.cdist(vq.embed[16:], x).min(dim=1).values
    assert dists.max() < 0.5


def test_residual_vq_error_decreases_with_more_codebooks():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 16, 8, decay=0.8).train()
    x = torch.randn(1024, 8)
    for _ in range(15):
        rvq(x)
    rvq.eval()
    errors = [(x - rvq.decode(rvq.encode(x, n_q=n))).pow(2).mean().item() for n in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.6 * errors[0]
    out = rvq(x)
    assert out.codes.shape == (4, 1024)
    assert torch.allclose(out.quantized, rvq.decode(out.codes), atol=1e-5)


def test_image_vq_on_real_images_beats_random_codebook(tmp_path):
    images = demo_images(image_size=16)[:384]  # sklearn's handwritten digits, upscaled
    assert images.shape == (384, 3, 16, 16) and -1 <= images.min() < images.max() <= 1
    cfg = ImageVQConfig(image_size=16, channels=16, downsample=2, codebook_size=64, code_dim=16)
    model, metrics = train_image_vq(images, cfg, steps=80, batch_size=32, lr=3e-3, device="cpu")
    # A random codebook with the trained one's statistics, behind the same trained encoder and decoder.
    rand = ImageVQVAE(cfg).eval()
    rand.load_state_dict(model.state_dict())
    with torch.no_grad():
        e = model.quantizer.embed
        rand.quantizer.embed.copy_(
            e.mean(0) + e.std(0) * torch.randn(e.shape, generator=torch.Generator().manual_seed(0))
        )
    baseline = evaluate_image_vq(rand, images)
    assert metrics["psnr"] > baseline["psnr"] + 4, (metrics, baseline)
    assert metrics["psnr"] > 18
    assert metrics["codebook_usage"] > 25

    codes = model.encode(images[:4])
    assert codes.shape == (4, 8, 8) and codes.dtype == torch.int64
    assert model.decode(codes).shape == (4, 3, 16, 16)
    save_codec(model, tmp_path)
    again = load_codec(tmp_path)
    assert isinstance(again, ImageVQVAE) and torch.equal(again.encode(images[:4]), codes)


def test_image_vq_rejects_bad_inputs():
    model = ImageVQVAE(ImageVQConfig(image_size=16, channels=8, codebook_size=16, code_dim=8)).eval()
    with pytest.raises(MediaError):
        model.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(MediaError):
        model.decode(torch.full((1, 4, 4), 16))
    with pytest.raises(ConfigError):
        ImageVQConfig(downsample=3)


def test_image_tokenizer_round_trip_pil(tmp_path):
    from PIL import Image, ImageDraw

    from omnilm.tokenizers.vq import ImageTokenizer

    torch.manual_seed(0)
    tok = ImageTokenizer(
        ImageVQVAE(ImageVQConfig(image_size=16, channels=8, downsample=2, codebook_size=32, code_dim=8))
    )
    img = Image.new("RGB", (40, 30), "white")
    ImageDraw.Draw(img).ellipse((5, 5, 30, 25), fill=(200, 30, 30))
    ids = tok.encode(img)
    assert len(ids) == tok.num_tokens == 64 and all(0 <= i < tok.vocab_size for i in ids)
    out = tok.decode(ids)
    assert out.size == (16, 16) and out.mode == "RGB"
    with pytest.raises(MediaError):
        tok.decode(ids[:-1])
    tok.save(tmp_path)
    assert ImageTokenizer.load(tmp_path).encode(img) == ids


def test_audio_tokenizer_resamples_and_orders_frames(tmp_path):
    import numpy as np

    from omnilm.config import AudioCodecConfig
    from omnilm.models.vq.codec import AudioCodec
    from omnilm.tokenizers.vq import AudioTokenizer

    torch.manual_seed(0)
    model = AudioCodec(
        AudioCodecConfig(sample_rate=8000, channels=8, strides=[2, 4], n_q=3, codebook_size=32, dim=16)
    )
    tok = AudioTokenizer(model)
    t = np.arange(1600) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # 0.1 s at 16 kHz -> 800 samples at 8 kHz
    ids = tok.encode(wav, sampling_rate=16000)
    assert len(ids) == 100 * 3  # 100 frames of hop 8, 3 codebooks each
    codes = model.encode(torch.from_numpy(wav[::2].copy())[None, None])  # (1, 3, 100)
    assert ids[:3] == codes[0, :, 0].tolist()  # frame-major: frame 0's three codes first
    out = tok.decode(ids)
    assert out.shape == (800,) and out.dtype == np.float32
    with pytest.raises(MediaError):
        tok.decode(ids[:-1])
    tok.save(tmp_path)
    assert AudioTokenizer.load(tmp_path).encode(wav, sampling_rate=16000) == ids


def test_cli_train_image_and_audio(tmp_path, capsys):
    from PIL import Image

    from omnilm.tokenizers.vq import (
        AudioTokenizer,
        ImageTokenizer,
        train_audio_tokenizer,
        train_image_tokenizer,
    )

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray((np.random.default_rng(i).random((20, 24, 3)) * 255).astype("uint8")).save(
            folder / f"{i}.png"
        )
    train_image_tokenizer(tmp_path / "img", 2, images=str(folder), image_size=16)
    assert "PSNR" in capsys.readouterr().out
    assert ImageTokenizer.load(tmp_path / "img").num_tokens == 16  # 16 px / downsample 4
    train_audio_tokenizer(tmp_path / "aud", 1, sample_rate=8000, clips=4)
    assert "SI-SNR" in capsys.readouterr().out
    assert AudioTokenizer.load(tmp_path / "aud").sample_rate == 8000
    with pytest.raises(MediaError, match="no images"):
        train_image_tokenizer(tmp_path / "x", 1, images=str(tmp_path / "aud"))
