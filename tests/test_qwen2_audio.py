"""Qwen2-Audio against transformers' Qwen2AudioForConditionalGeneration and Qwen2AudioProcessor on a tiny
random model: a full 30 s clip and a short clip (feature_attention_mask), greedy tokens, save back,
the processor on decoded audio files, and the placeholder-count errors."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

import omnilm
from omnilm.errors import ConfigError, MediaError
from omnilm.processing.audio import load_audio
from omnilm.processing.qwen2_audio import Qwen2AudioProcessor, audio_token_count

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


def make_tokenizer(path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "what is the sound in this audio clip",
        "generate the caption in english",
        "a dog barks twice",
    ] * 20
    tok.train_from_iterator(text, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


def speechlike(seconds, rate=16000, seed=0):
    """A chirp with a wandering pitch, amplitude envelope and noise: a non-trivial spectrum."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f = 180 + 120 * np.sin(2 * np.pi * 0.7 * t)
    wave = np.sin(2 * np.pi * np.cumsum(f) / rate) * (0.5 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (0.4 * wave + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("q2a")
    tok = make_tokenizer(root / "hf")
    audio_id = tok.token_to_id("<|AUDIO|>")
    torch.manual_seed(0)
    cfg = transformers.Qwen2AudioConfig(
        audio_config=dict(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=128
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=300,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        audio_token_index=audio_id,
    )
    ref = transformers.Qwen2AudioForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # move norms and biases off their init so a dropped one shows
        for name, p in ref.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    ref.save_pretrained(root / "hf")
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    fe.save_pretrained(root / "hf")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "hf" / "tokenizer.json"))
    hf_proc = transformers.Qwen2AudioProcessor(feature_extractor=fe, tokenizer=hf_tok)
    return ref, root / "hf", hf_proc, audio_id


def cli_generate(path, prompt, wav, new_tokens):
    argv = ["generate", "--model", path, "--prompt", prompt, "--audio", wav, "--max-new-tokens", new_tokens]
    return subprocess.run(
        [sys.executable, "-m", "omnilm", *map(str, argv)], capture_output=True, text=True, timeout=120
    )


def hf_inputs(hf_proc, prompt, clips):
    return hf_proc(text=prompt, audio=clips, sampling_rate=16000, return_tensors="pt")


PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>what is the sound<|audio_bos|><|AUDIO|><|audio_eos|>generate"


def test_processor_equals_transformers_on_decoded_files(tiny, tmp_path):
    _, path, hf_proc, audio_id = tiny
    files = []
    for i, (seconds, fmt) in enumerate([(31.0, "FLAC"), (7.3, "WAV")]):  # a clip cut at 30 s, a short one
        files.append(tmp_path / f"clip{i}.{fmt.lower()}")
        soundfile.write(files[-1], speechlike(seconds, seed=i), 16000, format=fmt, subtype="PCM_16")
    decoded = [load_audio(f, 16000) for f in files]
    proc = omnilm.load_processor(path)
    assert isinstance(proc, Qwen2AudioProcessor)
    got = proc(text=PROMPT, audio=[str(f) for f in files])
    ref = hf_inputs(hf_proc, PROMPT, decoded)
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["feature_attention_mask"], ref["feature_attention_mask"].long())
    assert (got["input_features"] - ref["input_features"]).abs().max() < 1e-4
    n = (got["input_ids"] == audio_id).sum()
    assert n == 750 + audio_token_count(int(np.ceil(7.3 * 16000 / 160)))


def test_logits_and_greedy_match_transformers(tiny):
    ref, path, hf_proc, audio_id = tiny
    model = omnilm.load(path)
    inputs = hf_inputs(hf_proc, PROMPT, [speechlike(30.0), speechlike(4.1, seed=3)])
    assert inputs["feature_attention_mask"][1].sum() < 3000  # the short clip is padded
    kw = dict(
        input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"]
    )
    with torch.no_grad():
        expected = ref(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **kw).logits
        got = model(input_ids=inputs["input_ids"], **kw).logits
    assert (got - expected).abs().max() <= 1e-4
    want = ref.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, eos_token_id=None)
    out = model.generate(inputs["input_ids"], max_new_tokens=12, eos_token_id=[], **kw)
    assert torch.equal(out, want)


def test_save_pretrained_loads_in_transformers(tiny, tmp_path):
    ref, path, hf_proc, _ = tiny
    omnilm.load(path).save_pretrained(tmp_path / "out")
    back = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    inputs = hf_inputs(hf_proc, "<|AUDIO|>what is", [speechlike(2.5)])
    with torch.no_grad():
        assert (back(**inputs).logits - ref(**inputs).logits).abs().max() <= 1e-4


def test_placeholder_count_mismatch_is_one_line_error(tiny, tmp_path):
    _, path, hf_proc, audio_id = tiny
    proc = omnilm.load_processor(path)
    with pytest.raises(MediaError, match="2 <|AUDIO|> marker"):
        proc(text="<|AUDIO|><|AUDIO|>", audio=[speechlike(1.0)])
    model = omnilm.load(path)
    inputs = proc(text="<|AUDIO|>what", audio=[speechlike(3.0)])
    ids = inputs["input_ids"][:, 1:]  # one placeholder short of the clip's length
    with pytest.raises(ConfigError, match="audio placeholder tokens"):
        model(
            input_ids=ids,
            input_features=inputs["input_features"],
            feature_attention_mask=inputs["feature_attention_mask"],
        )
    wav = tmp_path / "a.wav"
    soundfile.write(wav, speechlike(1.0), 16000)
    out = cli_generate(path, "<|AUDIO|> <|AUDIO|>", wav, 2)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), (
        out.stderr
    )


def test_cli_generates_from_an_audio_file(tiny, tmp_path):
    _, path, _, _ = tiny
    wav = tmp_path / "a.wav"
    soundfile.write(wav, speechlike(2.0), 16000)
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>what"
    out = cli_generate(path, prompt, wav, 3)
    assert out.returncode == 0, out.stderr
    pipe = omnilm.Pipeline.from_pretrained(path)  # the printed answer is the pipeline's, for the same file
    try:
        answer = pipe(prompt, audio=[str(wav)], max_new_tokens=3).text.strip()
        assert answer and out.stdout.strip() == answer
    finally:
        pipe.close()


def test_lora_step_trains(tiny):
    from lora_step import lora_steps_lower_the_loss

    _, path, _, _ = tiny
    proc = omnilm.load_processor(path)
    batch = proc(text="<|audio_bos|><|AUDIO|><|audio_eos|>generate the caption", audio=[speechlike(2.0)])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == proc.audio_token_id, -100)
    lora_steps_lower_the_loss(
        omnilm.load(path),
        input_ids=batch["input_ids"],
        input_features=batch["input_features"],
        feature_attention_mask=batch["feature_attention_mask"],
        labels=labels,
    )


def test_chat_messages_render_like_transformers(tiny):
    _, path, hf_proc, _ = tiny
    clips = [speechlike(1.5), speechlike(2.2, seed=4)]
    messages = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio_url": "a.wav"}, {"type": "text", "text": "what is it?"}],
        },
        {"role": "assistant", "content": "a dog barks twice"},
        {
            "role": "user",
            "content": [{"type": "audio", "audio_url": "b.wav"}, {"type": "text", "text": "and this?"}],
        },
    ]
    proc = omnilm.load_processor(path)
    text, sources = proc.render_messages(messages)
    assert text == hf_proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert sources == ["a.wav", "b.wav"]
    for m in messages:  # sources given by the caller instead
        for part in m["content"] if isinstance(m["content"], list) else []:
            part.pop("audio_url", None)
    got = proc(messages=messages, audio=clips)
    assert torch.equal(got["input_ids"], hf_inputs(hf_proc, text, clips)["input_ids"])


def test_served_chat_with_audio_equals_transformers(tiny, tmp_path):
    """The server hands the engine every family input (the feature mask of a clip shorter than 30 s)."""
    import base64
    import io
    import time

    from fastapi.testclient import TestClient

    from omnilm.serve.app import create_app
    from omnilm.serve.backend import Backend

    ref, path, hf_proc, _ = tiny
    clip = speechlike(2.0, seed=3)
    buf = io.BytesIO()
    soundfile.write(buf, clip, 16000, format="WAV", subtype="FLOAT")
    part = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(buf.getvalue()).decode(), "format": "wav"},
    }
    body = {"messages": [{"role": "user", "content": [part, {"type": "text", "text": "what is it?"}]}],
            "max_tokens": 6, "temperature": 0}  # fmt: skip
    with TestClient(create_app(lambda: Backend.load(path), model_name="q2a")) as client:
        while client.get("/health").status_code != 200:
            time.sleep(0.02)
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    hf_messages = [
        {
            "role": "user",
            "content": [{"type": "audio", "audio_url": "a.wav"}, {"type": "text", "text": "what is it?"}],
        }
    ]
    text = hf_proc.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    inputs = hf_inputs(hf_proc, text, [clip])
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=[], pad_token_id=0)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    want = hf_proc.tokenizer.decode(new, skip_special_tokens=True)
    got = r.json()["choices"][0]["message"]["content"]
    assert r.json()["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert want.startswith(got) and (got == want or r.json()["choices"][0]["finish_reason"] == "stop"), (
        got,
        want,
    )
