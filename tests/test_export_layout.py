"""Every Hugging Face-format export is a directory vLLM and transformers serve unchanged: the weight names
they load, config.json with `architectures` and dtype, the tokenizer with a chat template, the eos ids in
generation_config.json, the processor configs of a LLaVA. vLLM itself runs in `make test-vllm`
(scripts/test_vllm.py); these tests hold the layout in place without it.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import omnilm
from omnilm.config import DecoderConfig, ModelConfig, RopeScaling
from omnilm.tokenizers.chat import render_chat
from omnilm.tokenizers.text import ASSET_DIR, TextTokenizer

transformers = pytest.importorskip("transformers")

LLAMA_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}
LLAVA_FILES = LLAMA_FILES | {"preprocessor_config.json", "processor_config.json"}
MESSAGES = [
    {"role": "system", "content": " Answer briefly. "},
    {"role": "user", "content": "What is 12 plus 7?\n"},
    {"role": "assistant", "content": "It is 19."},
    {"role": "user", "content": [{"type": "text", "text": "And  now, 3 times 4?"}]},
]


def served_decoder(**kw):
    """head_dim 32 (vLLM CPU's smallest), tied embeddings, Llama-3 rope scaling, the bundled vocab."""
    base = dict(
        vocab_size=2048,
        hidden_size=64,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=128,
        max_seq_len=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_embeddings=True,
        initializer_range=0.2,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=128
        ),
    )
    return DecoderConfig(**{**base, **kw})


def perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def keys(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


def ids_of(text):
    return torch.tensor([TextTokenizer.default().encode(text, add_bos=True)])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "llama"
    perturb(omnilm.build(ModelConfig(decoder=served_decoder()))).save_pretrained(out)
    return out


def test_llama_export_files_names_and_configs(llama_dir):
    assert {p.name for p in llama_dir.iterdir()} == LLAMA_FILES
    hf_keys = set(
        transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(llama_dir)).state_dict()
    )
    assert keys(llama_dir) == hf_keys - {"lm_head.weight"}  # tied: the head is the embedding
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
    assert cfg["head_dim"] == 32
    gen = json.loads((llama_dir / "generation_config.json").read_text())
    tok = TextTokenizer.from_dir(llama_dir)
    assert gen["eos_token_id"] == [2, tok.eot_token_id]  # end of text, and the end of a chat turn
    assert gen["bos_token_id"] == 1 and gen["pad_token_id"] == 0
    tok_cfg = json.loads((llama_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] and tok_cfg["eos_token"] == "<|end_of_text|>"
    assert (llama_dir / "tokenizer.json").read_bytes() == (ASSET_DIR / "tokenizer.json").read_bytes()


def test_llama_export_loads_in_transformers_with_equal_logits_and_chat(llama_dir):
    model = omnilm.load(llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    text = "The quick brown fox jumps over 13 lazy dogs."
    ids = ids_of(text)
    assert hf_tok(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    chat = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    chat = chat["input_ids"] if isinstance(chat, dict) or hasattr(chat, "keys") else chat
    assert chat == render_chat(MESSAGES, TextTokenizer.from_dir(llama_dir), add_generation_prompt=True)[0]
    gen = transformers.GenerationConfig.from_pretrained(llama_dir)
    assert gen.eos_token_id == [2, hf_tok.convert_tokens_to_ids("<|eot_id|>")]


def test_convert_round_trip_carries_the_tokenizer_in_bf16(llama_dir, tmp_path):
    omnilm.load(llama_dir, dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    out = tmp_path / "bf16"
    assert {p.name for p in out.iterdir()} == LLAMA_FILES
    assert (out / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert all(v.dtype == torch.bfloat16 for v in load_file(out / "model.safetensors").values())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert hf.dtype == torch.bfloat16


def test_qwen2_export_loads_in_transformers_with_equal_logits(tmp_path):
    model = perturb(
        omnilm.build(
            ModelConfig(decoder=served_decoder(qkv_bias=True, tie_embeddings=False, rope_scaling=None))
        )
    )
    model.save_pretrained(tmp_path / "qwen2")
    out = tmp_path / "qwen2"
    assert {p.name for p in out.iterdir()} == LLAMA_FILES
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["dtype"] == "float32"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    ids = ids_of("Qwen2 keeps a bias on q, k and v.")
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_tiny_build_writes_bundled_tokenizer_and_unknown_vocab_writes_none(tmp_path):
    omnilm.build("tiny").save_pretrained(tmp_path / "tiny")
    assert (tmp_path / "tiny" / "tokenizer.json").read_bytes() == (ASSET_DIR / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "tiny" / "tokenizer_config.json").read_text())["chat_template"]
    # a vocabulary the bundled tokenizer was not made for: no tokenizer is better than a wrong one
    omnilm.build(ModelConfig(decoder=served_decoder(vocab_size=4096))).save_pretrained(tmp_path / "other")
    names = {p.name for p in (tmp_path / "other").iterdir()}
    assert "tokenizer.json" not in names and "generation_config.json" in names


def test_omnilm_format_export_gets_the_tokenizer_too(tmp_path):
    from omnilm.config import VisionConfig

    cfg = ModelConfig(
        decoder=served_decoder(),
        vision=VisionConfig(
            image_size=16,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_layers=1,
            num_heads=2,
            feature_layer=None,
        ),
        image_token_id=6,
    )
    omnilm.build(cfg).save_pretrained(tmp_path / "omni")
    names = {p.name for p in (tmp_path / "omni").iterdir()}
    assert {"omnilm_config.json", "tokenizer.json", "tokenizer_config.json"} <= names


# ---- LLaVA --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """`compose` of a Llama and a SigLIP tower (the production path), then save_pretrained of its load."""
    root = tmp_path_factory.mktemp("llava")
    perturb(omnilm.build(ModelConfig(decoder=served_decoder(rope_scaling=None)))).save_pretrained(
        root / "llama"
    )
    torch.manual_seed(0)
    siglip = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    transformers.SiglipVisionModel(siglip).save_pretrained(root / "siglip")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    from omnilm.convert.compose import compose

    perturb(compose(root / "llama", vision=root / "siglip", out=root / "composed"), seed=1)
    model = omnilm.load(root / "composed")
    perturb(model, seed=2).save_pretrained(root / "llava")
    return root


def test_llava_export_files_and_vllm_weight_layout(llava_dir):
    for name in ("composed", "llava"):
        out = llava_dir / name
        assert {p.name for p in out.iterdir()} >= LLAVA_FILES, name
        names = keys(out)
        tower = {k for k in names if k.startswith("vision_tower.")}
        assert tower and all(k.startswith("vision_tower.vision_model.") for k in tower), name
        prefixes = (
            "language_model.model.",
            "language_model.lm_head.",
            "vision_tower.",
            "multi_modal_projector.",
        )
        assert all(k.startswith(prefixes) for k in names), name
    out = llava_dir / "llava"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["dtype"] == "float32"
    meta = json.loads((out / "processor_config.json").read_text())
    assert meta["processor_class"] == "LlavaProcessor" and meta["image_token"] == "<|image|>"
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 5]


def test_llava_export_loads_in_transformers_with_equal_logits_and_processor(llava_dir):
    out = llava_dir / "llava"
    model = omnilm.load(out)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    text = "<|image|>Describe the image."
    ours = omnilm.load_processor(out)(text=text, images=[image])
    hf_proc = transformers.AutoProcessor.from_pretrained(out)
    assert type(hf_proc).__name__ == "LlavaProcessor"
    theirs = hf_proc(text=text, images=[image], return_tensors="pt")
    assert theirs["input_ids"].tolist() == ours["input_ids"].tolist()
    torch.testing.assert_close(theirs["pixel_values"], ours["pixel_values"])
    with torch.no_grad():
        expected = hf.eval()(input_ids=theirs["input_ids"], pixel_values=theirs["pixel_values"]).logits
        got = model(input_ids=ours["input_ids"], pixel_values=ours["pixel_values"]).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    rendered = hf_proc.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert rendered.startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>Describe"
    )


def test_llava_flat_tower_layout_still_loads(llava_dir, tmp_path):
    import shutil

    shutil.copytree(llava_dir / "llava", tmp_path / "flat")
    state = load_file(tmp_path / "flat" / "model.safetensors")
    flat = {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in state.items()}
    save_file(flat, tmp_path / "flat" / "model.safetensors")
    a, b = omnilm.load(llava_dir / "llava"), omnilm.load(tmp_path / "flat")
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a.image_features(pixels), b.image_features(pixels))


def test_a_source_chat_template_is_kept(tmp_path):
    """A transformers-written directory with its own template (chat_template.jinja) keeps it on convert."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    tok = transformers.AutoTokenizer.from_pretrained(ASSET_DIR)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok.save_pretrained(tmp_path / "src")
    omnilm.load(tmp_path / "src").save_pretrained(tmp_path / "out")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert again.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user] hi\n"
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == 2
