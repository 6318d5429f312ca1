"""Emu3 against transformers' Emu3ForConditionalGeneration / Emu3VQVAE on a tiny random model: logits with
an image in the prompt, greedy tokens, the VQ-VAE as an OmniLM codec, save back, and the image grammar."""

import subprocess
import sys

import pytest
import torch
from PIL import Image

import omnilm
from omnilm.errors import ConfigError
from omnilm.generation.emu3_grammar import generate_image

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

VOCAB, CODES = 352, 64
MARKERS = ["<|image start|>", "<|image token|>", "<image>", "<|extra_200|>", "<|extra_201|>", "<|image end|>"]
IMAGE_START, IMAGE_WRAPPER, IMAGE, EOL, EOF, IMAGE_END = range(280, 286)
VISUAL0 = 286


def make_tokenizer(path):
    """A byte-level BPE (pad 0, bos 1, eos 2) with Emu3's markers and visual tokens as special tokens."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["a red square on a blue sky", "draw a cat 4*4 8*8 16*16"] * 30, trainer)
    assert tok.get_vocab_size() == 280
    tok.add_special_tokens(MARKERS + [f"<|visual token {i:06d}|>" for i in range(CODES)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return {k: v for k, v in tok.get_vocab(with_added_tokens=True).items() if k in MARKERS or "visual" in k}


VQ = dict(
    codebook_size=CODES,
    embed_dim=4,
    latent_channels=4,
    base_channels=32,
    channel_multiplier=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[1],
    hidden_size=64,
    num_attention_heads=2,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("emu3") / "hf"
    vocabulary_map = make_tokenizer(path)
    assert vocabulary_map["<image>"] == IMAGE and vocabulary_map["<|visual token 000000|>"] == VISUAL0
    torch.manual_seed(0)
    cfg = transformers.Emu3Config(
        vq_config=VQ,
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            max_position_embeddings=1024,
        ),
        vocabulary_map=vocabulary_map,
    )
    ref = transformers.Emu3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # norms, batch-norm statistics and biases off their init values
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in ref.named_buffers():
            if "running_mean" in name:
                b.copy_(0.1 * torch.randn_like(b))
            elif "running_var" in name:
                b.copy_(1.0 + 0.2 * torch.rand_like(b))
    ref.save_pretrained(path)
    image_processor().save_pretrained(path)
    return ref, path


def image_processor():
    return transformers.Emu3ImageProcessor(min_pixels=64, max_pixels=256)  # 16 x 16 px: 8 x 8 codes


def image_prompt(h, w, seed=0):
    """A prompt with one image of h x w codes: [bos, text, header, placeholders, eof, image end, text]."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 200, (5,), generator=g).tolist()
    ids = [1, *text, IMAGE_START, 10, 11, IMAGE_WRAPPER] + [IMAGE] * (h * (w + 1)) + [EOF, IMAGE_END, 12, 13]
    return torch.tensor([ids])


def test_logits_and_greedy_with_an_image_match_transformers(tiny):
    ref, path = tiny
    model = omnilm.load(path)
    pixels = torch.rand(1, 3, 16, 24) * 2 - 1  # 8 x 12 codes at spatial factor 2
    sizes = torch.tensor([[16, 24]])
    ids = image_prompt(8, 12)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
        got = model(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    assert (got - expected).abs().max() <= 1e-4
    want = ref.generate(
        input_ids=ids,
        pixel_values=pixels,
        image_sizes=sizes,
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
    )
    out = model.generate(ids, pixel_values=pixels, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out, want)


def test_vq_codec_equals_transformers(tiny):
    ref, path = tiny
    codec = omnilm.load_codec(path)
    pixels = torch.rand(2, 3, 32, 24) * 2 - 1
    codes = codec.encode(pixels)
    expected = ref.model.vqmodel.encode(pixels, torch.tensor([[32, 24]] * 2)).image_tokens
    assert codes.shape == (2, 16, 12) and torch.equal(codes, torch.stack(expected))
    assert codes.unique().numel() > 4  # a real spread of codes, not one collapsed code
    with torch.no_grad():
        assert (codec.decode(codes) - ref.model.vqmodel.decode(codes)).abs().max() <= 1e-4
    with pytest.raises(ConfigError, match="outside the codebook"):
        codec.decode(torch.full((1, 2, 2), CODES))


def test_save_pretrained_loads_in_transformers(tiny, tmp_path):
    ref, path = tiny
    omnilm.load(path).save_pretrained(tmp_path / "out")
    back = transformers.Emu3ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    pixels, sizes, ids = torch.rand(1, 3, 8, 8) * 2 - 1, torch.tensor([[8, 8]]), image_prompt(4, 4, seed=1)
    with torch.no_grad():
        a = back(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
        b = ref(input_ids=ids, pixel_values=pixels, image_sizes=sizes).logits
    assert (a - b).abs().max() <= 1e-4


def test_placeholder_count_mismatch(tiny):
    _, path = tiny
    model = omnilm.load(path)
    with pytest.raises(ConfigError, match="placeholder"):
        model(input_ids=image_prompt(4, 3), pixel_values=torch.rand(1, 3, 8, 8))


def test_text_to_image_follows_the_grammar(tiny):
    _, path = tiny
    model, proc = omnilm.load(path), omnilm.load_processor(path)
    image, ids, codes = generate_image(
        model, proc, "a red square", 8, 12, guidance_scale=3.0, temperature=1.0, seed=5
    )
    h, w = 4, 6
    header = [IMAGE_START, *proc.tokenizer.encode(f"{h}*{w}"), IMAGE_WRAPPER]
    ids = ids.tolist()
    assert ids[: len(header)] == header
    body = ids[len(header) : len(header) + h * (w + 1)]
    for r in range(h):
        row = body[r * (w + 1) : (r + 1) * (w + 1)]
        assert all(VISUAL0 <= t < VISUAL0 + CODES for t in row[:-1]) and row[-1] == EOL
    assert ids[len(header) + h * (w + 1) :] == [EOF, IMAGE_END, 2]
    assert codes.shape == (h, w) and image.size == (12, 8)
    _, again, _ = generate_image(
        model, proc, "a red square", 8, 12, guidance_scale=3.0, temperature=1.0, seed=5
    )
    assert again.tolist() == ids


def test_cli_writes_a_png_of_the_requested_size(tiny, tmp_path):
    _, path = tiny
    cmd = [sys.executable, "-m", "omnilm", "generate", "--model", str(path), "--prompt", "a cat"]
    cmd += [
        "--output-image",
        str(tmp_path / "a.png"),
        "--image-size",
        "12x8",
        "--seed",
        "7",
        "--guidance-scale",
        "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    png = Image.open(tmp_path / "a.png")
    assert png.size == (12, 8)
    model, proc = omnilm.load(path), omnilm.load_processor(path)
    same, _, _ = generate_image(model, proc, "a cat", 8, 12, guidance_scale=2.0, temperature=1.0, seed=7)
    assert png.tobytes() == same.tobytes()  # same seed, same image
    other, _, _ = generate_image(model, proc, "a cat", 8, 12, guidance_scale=2.0, temperature=1.0, seed=8)
    assert other.tobytes() != same.tobytes()
    cmd[cmd.index("12x8")] = "4096x4096"
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "over the configured area" in out.stderr


def test_processor_equals_transformers_and_refuses_images_over_the_area(tiny, tmp_path):
    _, path = tiny
    proc = omnilm.load_processor(path)
    big = tmp_path / "big.png"
    Image.new("RGB", (40, 40)).save(big)  # 1600 pixels: over 4 x max_pixels
    with pytest.raises(omnilm.errors.MediaError, match="1600 pixels exceeds the limit of 1024"):
        proc(text="<image>what is this", images=[str(big)])
    small = tmp_path / "small.png"
    Image.fromarray((torch.rand(20, 28, 3) * 255).byte().numpy()).save(small)
    batch = proc(text="<image>what is this", images=[str(small)])
    ref = image_processor()(Image.open(small), return_tensors="pt")
    assert batch["pixel_values"].shape == ref["pixel_values"].shape
    assert (batch["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-5
    assert batch["image_sizes"].tolist() == ref["image_sizes"].tolist()


def test_pipeline_answers_about_an_image(tiny, tmp_path):
    _, path = tiny
    small = tmp_path / "small.png"
    Image.fromarray((torch.rand(20, 28, 3) * 255).byte().numpy()).save(small)
    pipe = omnilm.Pipeline.from_pretrained(path)
    try:
        out = pipe("<image>what is this", images=[str(small)], max_new_tokens=6, eos_token_id=[])
    finally:
        pipe.close()
    batch = pipe.processor(text="<image>what is this", images=[str(small)])
    want = pipe.model.generate(
        batch["input_ids"], pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"],
        max_new_tokens=6, eos_token_id=[],
    )  # fmt: skip
    assert out.token_ids == want[0, batch["input_ids"].shape[1] :].tolist()
