"""Emu3 against transformers' Emu3ForConditionalGeneration / Emu3VQVAE on a tiny random model: logits with
an image in the prompt, greedy tokens, the VQ-VAE as an OmniLM codec, save back, and the image grammar."""

import pytest
import torch

import omnilm
from omnilm.errors import ConfigError

transformers = pytest.importorskip("transformers")

VOCAB, CODES = 300, 64
IMAGE_START, IMAGE_WRAPPER, IMAGE, EOL, EOF, IMAGE_END = 280, 281, 290, 291, 292, 293


def vocabulary_map():
    vm = {"<|image start|>": IMAGE_START, "<|image token|>": IMAGE_WRAPPER, "<image>": IMAGE}
    vm.update({"<|extra_200|>": EOL, "<|extra_201|>": EOF, "<|image end|>": IMAGE_END})
    vm.update({f"<|visual token {i:06d}|>": 200 + i for i in range(CODES)})
    return vm


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
        vocabulary_map=vocabulary_map(),
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
    return ref, path


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
