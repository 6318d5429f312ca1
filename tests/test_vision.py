"""The vision tower and LLaVA models against transformers on tiny random configs, through the production
conversion code (omnilm.load_encoder / omnilm.load / save_pretrained)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnilm
from omnilm.config import ModelConfig, VisionConfig
from omnilm.convert.vision import vision_config_from_hf
from omnilm.errors import CheckpointError, ConfigError

transformers = pytest.importorskip("transformers")

IMAGE_TOKEN = 99
TOL = 1e-4


def tower_config(kind, layers=2, image_size=32, **kw):
    cls = transformers.SiglipVisionConfig if kind == "siglip" else transformers.CLIPVisionConfig
    return cls(
        hidden_size=32,
        intermediate_size=72,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        **kw,
    )


def save_tower(tmp_path, kind, seed=0):
    torch.manual_seed(seed)
    cls = transformers.SiglipVisionModel if kind == "siglip" else transformers.CLIPVisionModel
    hf = cls(tower_config(kind)).eval()
    hf.save_pretrained(tmp_path)
    return hf


def save_llava(tmp_path, kind, seed=0, **llava_kw):
    torch.manual_seed(seed)
    text = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
    )
    cfg = transformers.LlavaConfig(
        vision_config=tower_config(kind, layers=3), text_config=text, image_token_id=IMAGE_TOKEN, **llava_kw
    )
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf


def prompt(n_tokens, runs):
    """Text ids with `runs` blocks of n_tokens placeholders at different places."""
    ids = [3, 17, 42]
    for i in range(runs):
        ids += [IMAGE_TOKEN] * n_tokens + [11 + i, 50 + 7 * i]
    return torch.tensor([ids + [64]])


# ---- the tower alone ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_encoder_matches_transformers(tmp_path, kind):
    hf = save_tower(tmp_path, kind)
    enc = omnilm.load_encoder(tmp_path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        out = enc(x)
        assert out.shape == ref.shape == (3, 16 + (kind == "clip"), 32)
        assert (out - ref).abs().max() <= TOL
        # pooled output too: SigLIP's attention-pooling head, CLIP's normed CLS
        assert (enc.pooled(x) - hf(pixel_values=x).pooler_output).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_encoder_interpolates_positions_for_other_sizes(tmp_path, kind):
    hf = save_tower(tmp_path, kind)
    enc = omnilm.load_encoder(tmp_path)
    x = torch.randn(2, 3, 48, 40)  # a 6x5 patch grid instead of the trained 4x4
    with torch.no_grad():
        ref = hf(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        out = enc(x)
    assert out.shape == (2, 30 + (kind == "clip"), 32)
    assert (out - ref).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_encoder_from_dual_image_text_model(tmp_path, kind):
    """A whole SigLIP / CLIP (vision + text) directory: load_encoder keeps the vision half."""
    torch.manual_seed(0)
    if kind == "siglip":
        text = transformers.SiglipTextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
        )
        cfg = transformers.SiglipConfig(
            text_config=text.to_dict(), vision_config=tower_config(kind).to_dict()
        )
        hf = transformers.SiglipModel(cfg).eval()
    else:
        text = transformers.CLIPTextConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4
        )
        cfg = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=tower_config(kind).to_dict())
        hf = transformers.CLIPModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    enc = omnilm.load_encoder(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (enc(x) - hf.vision_model(pixel_values=x).last_hidden_state).abs().max() <= TOL


def test_encoder_loads_vision_model_prefix_and_bf16(tmp_path):
    hf = save_tower(tmp_path, "siglip")
    # Hub checkpoints of SiglipVisionModel carry a `vision_model.` level
    state = load_file(tmp_path / "model.safetensors")
    save_file({"vision_model." + k: v for k, v in state.items()}, tmp_path / "model.safetensors")
    enc = omnilm.load_encoder(tmp_path, dtype=torch.bfloat16)
    assert enc.post_layernorm.weight.dtype == torch.bfloat16
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        err = (enc(x.bfloat16()).float() - hf(pixel_values=x).last_hidden_state).abs().max()
    assert err < 0.1


def test_encoder_rejects_unknown_keys(tmp_path):
    save_tower(tmp_path, "clip")
    state = load_file(tmp_path / "model.safetensors")
    state["encoder.layers.9.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="encoder.layers.9.extra.weight"):
        omnilm.load_encoder(tmp_path)


# ---- LLaVA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_llava_logits_match_one_and_two_images(tmp_path, kind):
    hf = save_llava(tmp_path, kind)
    model = omnilm.load(tmp_path)
    n = model.config.vision.tokens_per_image
    assert n == 16 - 1 + (kind == "clip")  # "default" selection drops the first token (CLIP's CLS)
    for runs in (1, 2):
        ids = prompt(n, runs)
        pixels = torch.randn(runs, 3, 32, 32)
        with torch.no_grad():
            ref = hf(input_ids=ids, pixel_values=pixels).logits
            out = model(input_ids=ids, pixel_values=pixels).logits
        assert (out - ref).abs().max() <= TOL
    # the images matter: swapping them changes the logits after the first image
    with torch.no_grad():
        swapped = model(input_ids=ids, pixel_values=pixels.flip(0)).logits
    assert (swapped - out).abs().max() > 1e-3


def test_llava_batch_with_images_in_different_rows(tmp_path):
    hf = save_llava(tmp_path, "siglip", vision_feature_layer=[-3, -1], vision_feature_select_strategy="full")
    model = omnilm.load(tmp_path)
    n = model.config.vision.tokens_per_image
    a, b = prompt(n, 1)[0], prompt(n, 1)[0].roll(2)  # the image block at different positions per row
    ids = torch.stack([a, b])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
        out = model(input_ids=ids, pixel_values=pixels).logits
    assert model.config.vision.feature_dim == 64  # two layers concatenated
    assert (out - ref).abs().max() <= TOL


def test_llava_new_key_layout_loads(tmp_path):
    hf = save_llava(tmp_path, "clip")
    # transformers 5 runtime names: model.language_model.*, model.vision_tower.*, lm_head.*
    renames = (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    )
    state = {}
    for k, v in load_file(tmp_path / "model.safetensors").items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        state[k] = v
    assert any(k.startswith("model.vision_tower.vision_model.") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    model = omnilm.load(tmp_path)
    ids = prompt(model.config.vision.tokens_per_image, 1)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (
            model(input_ids=ids, pixel_values=pixels).logits - hf(input_ids=ids, pixel_values=pixels).logits
        ).abs().max() <= TOL


def test_llava_save_pretrained_round_trips_through_transformers(tmp_path):
    save_llava(tmp_path / "src", "siglip")
    model = omnilm.load(tmp_path / "src")
    assert model.hf_format == "llava"
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llava"
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    again = omnilm.load(tmp_path / "out")
    ids = prompt(model.config.vision.tokens_per_image, 2)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels).logits
        assert (hf(input_ids=ids, pixel_values=pixels).logits - out).abs().max() <= TOL
        assert torch.equal(again(input_ids=ids, pixel_values=pixels).logits, out)


def test_placeholder_count_mismatch_raises(tmp_path):
    save_llava(tmp_path, "siglip")
    model = omnilm.load(tmp_path)
    n = model.config.vision.tokens_per_image
    with pytest.raises(ConfigError, match="placeholder"):
        model(input_ids=prompt(n, 2), pixel_values=torch.randn(1, 3, 32, 32))  # two runs, one image
    with pytest.raises(ConfigError, match="placeholder"):
        model(input_ids=prompt(n - 1, 1), pixel_values=torch.randn(1, 3, 32, 32))  # run one short


def test_llava_rejects_non_llama_text(tmp_path):
    save_llava(tmp_path, "siglip")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["text_config"]["model_type"] = "mistral"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mistral"):
        omnilm.load(tmp_path)


# ---- config ---------------------------------------------------------------------------------------------------


def test_vision_config_tokens_and_round_trip():
    v = VisionConfig(
        kind="siglip", image_size=384, patch_size=16, pixel_shuffle=2, hidden_size=64, num_heads=4
    )
    assert v.num_patches == 576 and v.tokens_per_image == 144
    so400m = VisionConfig(image_size=384, patch_size=14, hidden_size=1152, num_heads=16)
    assert so400m.tokens_per_image == 729  # the conv floors 384 / 14 to 27
    clip = VisionConfig(
        kind="clip", image_size=336, patch_size=14, feature_layer=-2, feature_select="default"
    )
    assert clip.tokens_per_image == 576  # LLaVA-1.5's count
    cfg = ModelConfig(vision=clip, image_token_id=5)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).vision == clip


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(kind="vit"), "kind"),
        (dict(image_size=8, patch_size=16), "smaller"),
        (dict(feature_layer=13, num_layers=12), "out of range"),
        (dict(kind="clip", pixel_shuffle=2), "square"),  # CLS token: not a square grid
        (dict(image_size=48, patch_size=16, pixel_shuffle=2), "divisible"),
    ],
)
def test_vision_config_rejects_inconsistent_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        VisionConfig(**kw)


def test_vision_config_from_hf_llava_defaults():
    d = {
        "model_type": "llava",
        "vision_config": {
            "model_type": "clip_vision_model",
            "image_size": 336,
            "patch_size": 14,
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "intermediate_size": 4096,
        },
    }
    v = vision_config_from_hf(d)
    assert (v.kind, v.feature_layer, v.feature_select, v.hidden_act, v.tokens_per_image) == (
        "clip",
        -2,
        "default",
        "quick_gelu",
        576,
    )
    with pytest.raises(CheckpointError, match="dinov2"):
        vision_config_from_hf({"model_type": "dinov2"})


def test_llava_hub_style_sparse_config():
    """llava-hf/llava-1.5-7b-hf's config.json lists only what differs from the transformers defaults."""
    from omnilm.convert.vision import llava_model_config

    d = {
        "model_type": "llava",
        "image_token_index": 32000,
        "vision_feature_layer": -2,
        "text_config": {
            "model_type": "llama",
            "vocab_size": 32064,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 1024,
            "image_size": 336,
            "patch_size": 14,
            "intermediate_size": 4096,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
        },
    }
    cfg = llava_model_config(d, has_head=False)
    dec = cfg.decoder
    assert (dec.vocab_size, dec.hidden_size, dec.num_layers, dec.intermediate_size, dec.rope_theta) == (
        32064,
        4096,
        32,
        11008,
        10000.0,
    )
    assert cfg.image_token_id == 32000 and cfg.vision.tokens_per_image == 576 and not dec.tie_embeddings


def test_pixel_shuffle_model_builds_and_runs():
    from omnilm.config import DecoderConfig

    cfg = ModelConfig(
        decoder=DecoderConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
        vision=VisionConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_layers=1,
            num_heads=2,
            pixel_shuffle=2,
        ),
        image_token_id=63,
    )
    model = omnilm.build(cfg)
    n = cfg.vision.tokens_per_image
    assert n == 4
    ids = torch.tensor([[1, 2] + [63] * n + [3]])
    out = model(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32)).logits
    assert out.shape == (1, 3 + n, 64) and torch.isfinite(out).all()


def test_llava_greedy_generate_matches_transformers(tmp_path):
    hf = save_llava(tmp_path, "clip", seed=3)
    model = omnilm.load(tmp_path)
    ids = prompt(model.config.vision.tokens_per_image, 2)
    pixels = torch.randn(2, 3, 32, 32)
    ref = hf.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)
    out = model.generate(ids, pixel_values=pixels, max_new_tokens=8)
    assert out.tolist() == ref.tolist()
