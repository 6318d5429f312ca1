"""The unified (discrete early-fusion) model: per-modality loss, span-controlled generation, guidance,
overfitting an interleaved text<->image set, save/load, media decoding, and the continuous path beside it."""

import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import omnilm
from omnilm.config import DecoderConfig, DiscreteConfig, ImageVQConfig, ModelConfig, VisionConfig, get_preset
from omnilm.errors import ConfigError, MediaError
from omnilm.generation.generate import generate
from omnilm.generation.processors import (
    AUDIO_CODES,
    IMAGE_CODES,
    IMAGE_END,
    TEXT,
    SpanController,
    guide,
    null_prompt,
)
from omnilm.models.discrete import modality_of
from omnilm.processing.media_out import decode_media, find_spans
from omnilm.tokenizers.text import TextTokenizer

IMG0, BOS, EOS = 2048, 1, 2
IS, IE, AS, AE = 8, 9, 10, 11  # the default tokenizer's span markers


def tiny_cfg(**discrete):
    cfg = get_preset("tiny")
    kw = dict(image_vocab_size=16, image_grid=3, audio_vocab_size=8, audio_codebooks=2, audio_frames=2)
    kw.update(discrete)
    cfg.discrete = DiscreteConfig(**kw)
    return cfg


def build(seed=0, **discrete):
    return omnilm.build(tiny_cfg(**discrete), seed=seed)


def test_config_layout_and_errors():
    d = tiny_cfg().discrete
    assert (d.image_offset, d.audio_offset, d.vocab_size) == (2048, 2064, 2072)
    assert (d.tokens_per_image, d.tokens_per_audio) == (9, 4)
    with pytest.raises(ConfigError, match="image_start_id"):
        DiscreteConfig(text_vocab_size=8)
    with pytest.raises(ConfigError, match="codebook_size"):
        DiscreteConfig(image_vocab_size=16, image_grid=3, image_tokenizer=ImageVQConfig(codebook_size=32))
    cfg = tiny_cfg(text_vocab_size=4096)
    with pytest.raises(ConfigError, match="must equal decoder.vocab_size"):
        omnilm.build(cfg)


def test_per_modality_loss_matches_manual():
    cfg = tiny_cfg(text_loss_weight=0.5, image_loss_weight=2.0, audio_loss_weight=1.0)
    model = omnilm.build(cfg, seed=1)
    d = cfg.discrete
    g = torch.Generator().manual_seed(0)
    ids = torch.cat(
        [
            torch.tensor([BOS, 300, 301, IS]),
            torch.randint(d.image_offset, d.audio_offset, (9,), generator=g),
            torch.tensor([IE, 400, AS]),
            torch.randint(d.audio_offset, d.vocab_size, (4,), generator=g),
            torch.tensor([AE, EOS]),
        ]
    )[None].repeat(2, 1)
    labels = ids.clone()
    labels[1, :5] = -100  # ignored targets stay ignored
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (2, ids.shape[1], d.vocab_size)

    logits, targets = out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    sums, counts = {}, {}
    for name, lo, hi in (("text", 0, 2048), ("image", 2048, 2064), ("audio", 2064, 2072)):
        sel = (targets >= lo) & (targets < hi)
        sums[name] = F.cross_entropy(logits[sel, lo:hi], targets[sel] - lo, reduction="sum")
        counts[name] = int(sel.sum())
        torch.testing.assert_close(out.losses[name], sums[name] / counts[name])
    w = {"text": 0.5, "image": 2.0, "audio": 1.0}
    expected = sum(w[k] * sums[k] for k in w) / sum(w[k] * counts[k] for k in w)
    torch.testing.assert_close(out.loss, expected)
    # the head of the target's modality: an image target is not scored against text logits
    assert not torch.allclose(out.loss, F.cross_entropy(logits[targets != -100], targets[targets != -100]))
    out.loss.backward()
    assert model.discrete.image_head.weight.grad.abs().sum() > 0
    assert model.discrete.modality_embed.weight.grad.abs().sum() > 0


def test_plain_model_keeps_single_head_loss():
    model = omnilm.build("tiny")
    ids = torch.randint(3, 2048, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    )
    assert model.discrete is None


def check_spans(d, ids):
    """Walk generated ids: outside spans only text, each span exactly the right codes, then its end marker."""
    state, left = "text", 0
    for t in ids:
        if state == "text":
            assert t < d.text_vocab_size and t not in (IE, AE), t
            if t in (IS, AS):
                state, left = ("image", d.tokens_per_image) if t == IS else ("audio", d.tokens_per_audio)
        elif state in ("image", "audio"):
            lo, hi = (d.image_offset, d.audio_offset) if state == "image" else (d.audio_offset, d.vocab_size)
            assert lo <= t < hi, (state, t)
            left -= 1
            if left == 0:
                state = "end_" + state
        else:
            assert t == (IE if state == "end_image" else AE), t
            state = "text"
    return state


@pytest.mark.parametrize("marker,modality", [(IS, "image"), (AS, "audio")])
def test_span_has_exact_length_and_only_its_codes(marker, modality):
    model = build(seed=2)
    d = model.config.discrete
    n = d.tokens_per_image if modality == "image" else d.tokens_per_audio
    prompt = torch.tensor([[BOS, 500, 501, marker], [BOS, 600, 601, marker]])
    out = generate(model, prompt, max_new_tokens=n + 6, temperature=1.0, seed=0, eos_token_id=[])
    new = out[:, prompt.shape[1] :]
    lo, hi = (d.image_offset, d.audio_offset) if modality == "image" else (d.audio_offset, d.vocab_size)
    assert ((new[:, :n] >= lo) & (new[:, :n] < hi)).all()
    assert (new[:, n] == (IE if modality == "image" else AE)).all()
    assert (new[:, n + 1 :] < d.text_vocab_size).all()  # text resumes
    for row in out.tolist():
        check_spans(d, row)
    assert [s.modality for s in find_spans(d, out[0])] == [modality]


def test_controller_state_machine():
    d = tiny_cfg().discrete
    ctl = SpanController(d, 1)
    assert not ctl.process(torch.zeros(1, d.vocab_size))[0, IMG0:].isfinite().any()
    script = [300, IS] + [IMG0] * 9 + [IE, AS] + [d.audio_offset] * 4 + [AE, 301]
    states = []
    for t in script:
        ctl.update(torch.tensor([t]))
        states.append(int(ctl.state))
    assert states[1] == IMAGE_CODES and states[10] == IMAGE_END and states[11] == TEXT
    assert states[12] == AUDIO_CODES and states[-2] == TEXT and states[-1] == TEXT
    # replaying a prompt that stops mid-span resumes the count
    ctl = SpanController.from_prompt(d, torch.tensor([[BOS, IS, IMG0, IMG0 + 1]]))
    assert int(ctl.state) == IMAGE_CODES and int(ctl.left) == 7
    allowed = ctl.process(torch.zeros(1, d.vocab_size))[0].isfinite()
    assert allowed.nonzero().flatten().tolist() == list(range(d.image_offset, d.audio_offset))


def test_guidance_rows_combine_as_specified():
    model = build(seed=3)
    d = model.config.discrete
    scale = 4.0
    prompt = torch.tensor([[BOS, 700, 701, 702, IS]])
    uncond = torch.tensor(null_prompt(d, prompt, bos_token_id=BOS))
    assert uncond.tolist() == [[BOS, IS]]
    out = generate(model, prompt, max_new_tokens=3, temperature=0.0, guidance_scale=scale, eos_token_id=[])
    # the same three steps by hand, full forward passes without a cache, cond and uncond separately
    cond_seq, uncond_seq, expected = prompt, uncond, []
    for _ in range(3):
        c = model(input_ids=cond_seq).logits[0, -1]
        u = model(input_ids=uncond_seq).logits[0, -1]
        g = guide(c, u, scale)[d.image_offset : d.audio_offset]
        t = int(g.argmax()) + d.image_offset
        expected.append(t)
        cond_seq = torch.cat([cond_seq, torch.tensor([[t]])], 1)
        uncond_seq = torch.cat([uncond_seq, torch.tensor([[t]])], 1)
    assert out[0, prompt.shape[1] :].tolist() == expected
    # 3 steps stay inside the span, so only the image head ran; a longer call (all heads, the span
    # controller masking) picks the same codes
    longer = generate(
        model, prompt, max_new_tokens=d.tokens_per_image + 2, guidance_scale=scale, eos_token_id=[]
    )
    assert longer[0, prompt.shape[1] : prompt.shape[1] + 3].tolist() == expected
    check_spans(d, longer[0].tolist())
    unguided = generate(model, prompt, max_new_tokens=3, temperature=0.0, eos_token_id=[])
    assert unguided[0, prompt.shape[1] :].tolist() != expected  # guidance changed the picks
    torch.testing.assert_close(guide(torch.tensor([3.0]), torch.tensor([1.0]), 2.5), torch.tensor([6.0]))


def interleaved_set():
    tok = TextTokenizer.default()
    captions = ["a red square", "two blue dots", "green stripes"]
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 16, (9,), generator=g) + IMG0 for _ in captions]
    seqs, n_prompt = [], []  # the prompt (condition) of each sequence is not a target
    for cap, img in zip(captions, images):
        text = tok.encode(cap)
        seqs.append([BOS] + text + [IS] + img.tolist() + [IE, EOS])  # text -> image
        n_prompt.append(1 + len(text))
        seqs.append([BOS, IS] + img.tolist() + [IE] + text + [EOS])  # image -> text
        n_prompt.append(2 + len(img) + 1)
    return tok, captions, images, seqs, n_prompt


def test_tiny_unified_model_overfits_interleaved_text_and_images():
    tok, captions, images, seqs, n_prompt = interleaved_set()
    model = build(seed=4).train()
    T = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
    labels = torch.tensor([[-100] * n + s[n:] + [-100] * (T - len(s)) for s, n in zip(seqs, n_prompt)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(100):
        out = model(input_ids=ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.losses["image"] < 0.05 and out.losses["text"] < 0.05, out.losses
    model.eval()
    for cap, img in zip(captions, images):
        text = tok.encode(cap)
        gen = model.generate(torch.tensor([[BOS] + text + [IS]]), max_new_tokens=11, eos_token_id=EOS)
        assert gen[0, len(text) + 2 :].tolist() == img.tolist() + [IE, EOS]
        gen = model.generate(torch.tensor([[BOS, IS] + img.tolist() + [IE]]), max_new_tokens=len(text) + 1)
        assert tok.decode(gen[0, 12:]) == cap


def test_save_load_round_trip_keeps_logits(tmp_path):
    cfg = tiny_cfg(
        image_vocab_size=16, image_grid=2, image_tokenizer=ImageVQConfig(image_size=8, codebook_size=16)
    )
    model = omnilm.build(cfg, seed=5)
    model.save_pretrained(tmp_path)
    loaded = omnilm.load(tmp_path)
    assert loaded.config.discrete == cfg.discrete
    assert isinstance(loaded.config.discrete.image_tokenizer, ImageVQConfig)
    ids = torch.tensor(
        [[BOS, 900, IS, IMG0 + 3, IMG0 + 5, IMG0, IMG0 + 15, IE, AS, 2064 + 7, 2064, 2064 + 1, 2064 + 2]]
    )
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def tiny_codecs():
    from omnilm.config import AudioCodecConfig
    from omnilm.models.vq.codec import AudioCodec
    from omnilm.models.vq.image_vqvae import ImageVQVAE

    torch.manual_seed(0)
    vq = ImageVQVAE(
        ImageVQConfig(image_size=12, downsample=4, codebook_size=16, channels=8, code_dim=8)
    ).eval()
    codec = AudioCodec(AudioCodecConfig(channels=4, strides=[2, 2], n_q=2, codebook_size=8, dim=8)).eval()
    return vq, codec


def test_decode_media_with_real_codecs(tmp_path):
    from omnilm.tokenizers.vq import AudioTokenizer, ImageTokenizer

    vq, codec = tiny_codecs()
    d = tiny_cfg().discrete
    img = torch.randint(0, 16, (3, 3))
    aud = torch.randint(0, 8, (2, 2))  # (n_q, frames)
    ids = [BOS, 55, IS, *(img.flatten() + d.image_offset).tolist(), IE, 56, AS]
    ids += (aud.T.flatten() + d.audio_offset).tolist() + [AE, IS, IMG0]  # a truncated span is skipped
    images, waves = decode_media(d, torch.tensor(ids), image_tokenizer=vq, audio_tokenizer=codec)
    assert len(images) == 1 and images[0].size == (12, 12) and len(waves) == 1
    ref = ((vq.decode(img[None])[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8)
    assert torch.equal(torch.from_numpy(np.array(images[0])), ref)
    np.testing.assert_allclose(waves[0][0], codec.decode(aud[None]).flatten().numpy())
    assert waves[0][1] == 16000
    with pytest.raises(MediaError, match="image tokenizer"):
        decode_media(d, torch.tensor(ids))
    # the tokenizer wrappers saved beside a model are found in its directory and give the same media
    ImageTokenizer(vq).save(tmp_path / "image_tokenizer")
    AudioTokenizer(codec).save(tmp_path / "audio_tokenizer")
    images2, waves2 = decode_media(d, ids, model_dir=tmp_path)
    diff = np.abs(np.array(images2[0]).astype(int) - np.array(images[0]).astype(int))
    assert diff.max() <= 1
    np.testing.assert_allclose(waves2[0][0], waves[0][0], atol=1e-6)


def test_cli_generate_writes_png_and_wav(tmp_path, capsys):
    import soundfile

    from omnilm.cli import main
    from omnilm.processing.multimodal import load_processor
    from omnilm.tokenizers.vq import AudioTokenizer, ImageTokenizer

    vq, codec = tiny_codecs()
    TextTokenizer.default().save(tmp_path)
    ImageTokenizer(vq).save(tmp_path / "image_tokenizer")
    AudioTokenizer(codec).save(tmp_path / "audio_tokenizer")
    prompt = load_processor(tmp_path)(text="draw and sing")["input_ids"][0].tolist()
    img = torch.randint(0, 16, (9,), generator=torch.Generator().manual_seed(1))
    aud = torch.randint(0, 8, (4,), generator=torch.Generator().manual_seed(2))  # frame-major
    target = [IS, *(img + IMG0).tolist(), IE, AS, *(aud + 2064).tolist(), AE, EOS]
    model = build(seed=7).train()  # taught to answer the prompt with one image and one audio span
    ids = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().save_pretrained(tmp_path)

    png, wav = tmp_path / "out.png", tmp_path / "out.wav"
    argv = ["generate", "--model", str(tmp_path), "--prompt", "draw and sing", "--max-new-tokens", "24"]
    assert main(argv + ["--output-image", str(png), "--output-audio", str(wav)]) == 0
    from PIL import Image

    got = np.array(Image.open(png))
    ref = ((vq.decode(img.view(1, 3, 3))[0] + 1) * 127.5).round().permute(1, 2, 0).to(torch.uint8).numpy()
    assert got.shape == (12, 12, 3) and np.abs(got.astype(int) - ref.astype(int)).max() <= 1
    wave, rate = soundfile.read(wav, dtype="float32")
    assert rate == 16000
    np.testing.assert_allclose(wave, codec.decode(aud.view(2, 2).T[None]).flatten().numpy(), atol=1e-4)
    guided = tmp_path / "guided.png"
    assert main(argv + ["--guidance-scale", "3", "--output-image", str(guided)]) == 0
    assert Image.open(guided).size == (12, 12)
    assert (
        main(
            ["generate", "--model", str(tmp_path), "--prompt", "x", "--output-image", str(png)]
            + ["--max-new-tokens", "1"]
        )
        == 2
    )
    assert "no image span" in capsys.readouterr().err

    # the same model behind the server: a chat asking for audio gets the span as a base64 WAV
    import base64
    import io

    from fastapi.testclient import TestClient

    from omnilm.serve.app import create_app
    from omnilm.serve.backend import Backend

    body = {"messages": [{"role": "user", "content": "draw and sing"}], "modalities": ["text", "audio"],
            "max_tokens": 24}  # fmt: skip
    with TestClient(create_app(lambda: Backend.load(tmp_path), model_name="m")) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.02)
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    audio = r.json()["choices"][0]["message"]["audio"]
    served, rate = soundfile.read(io.BytesIO(base64.b64decode(audio["data"])), dtype="float32")
    assert rate == 16000 and audio["id"].startswith("audio-") and audio["expires_at"] > time.time()
    np.testing.assert_allclose(served, wave, atol=1e-4)


def test_continuous_understanding_beside_discrete_generation():
    vision = VisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2
    )
    cfg = ModelConfig(
        decoder=DecoderConfig(
            vocab_size=2048, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
        ),
        vision=vision,
        discrete=DiscreteConfig(image_vocab_size=16, image_grid=2),
        image_token_id=6,
    )
    model = omnilm.build(cfg, seed=6)
    n = vision.tokens_per_image
    ids = torch.tensor([[BOS] + [6] * n + [300, IS, IMG0, IMG0 + 1, IMG0 + 2, IMG0 + 3, IE]])
    pix = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, pixel_values=pix, labels=ids)
    assert set(out.losses) == {"text", "image"}
    other = model(input_ids=ids, pixel_values=pix.flip(-1), labels=ids)
    assert not torch.allclose(out.logits[0, -1], other.logits[0, -1])  # the SigLIP features reach the codes
    assert modality_of(ids, cfg.discrete)[0, -5:-1].eq(1).all()
    gen = model.generate(ids[:, :-5], pixel_values=pix, max_new_tokens=5, temperature=1.0, seed=0)
    assert [s.modality for s in find_spans(cfg.discrete, gen[0])] == ["image"]


def test_unified_8b_plan_counts_discrete_tables():
    from omnilm.plan import count_params

    cfg = get_preset("unified-8b")
    d = cfg.discrete
    assert (d.image_vocab_size, d.audio_vocab_size) == (16384, 1024)
    groups = count_params(cfg)
    hidden = cfg.decoder.hidden_size
    assert groups["discrete"] == 2 * (16384 + 1024) * hidden + 3 * hidden
