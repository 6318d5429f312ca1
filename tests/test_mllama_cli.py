"""Mllama through the CLI: generate with an image works; bad image input is one line `error: ...`,
exit 2 (an aspect ratio outside the supported list, more images than <|image|> markers, a
processor that tiles over the model's max_num_tiles)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_errors import assert_one_line_error, run_cli

import omnilm
from omnilm.config import CrossAttentionConfig, DecoderConfig, MllamaVisionConfig, ModelConfig
from omnilm.tokenizers.text import TextTokenizer

TILE = 20


def tiny_config(**vision):
    decoder = DecoderConfig(
        vocab_size=2048,  # the default tokenizer's
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_seq_len=256,
        rope_theta=10000.0,
        tie_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    v = MllamaVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_global_layers=1,
        num_heads=4,
        image_size=TILE,
        patch_size=4,
        intermediate_layers_indices=[0],
        **vision,
    )
    ca = CrossAttentionConfig(layers=[1], vision=v, image_token_id=2048, extra_embeddings=8)
    return ModelConfig(decoder=decoder, cross_attention=ca)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mllama_cli")
    model = omnilm.build(tiny_config(supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [2, 2]]))
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            if hasattr(layer, "cross_attn_attn_gate"):
                layer.cross_attn_attn_gate.fill_(0.5)
    model.save_pretrained(root / "m")
    TextTokenizer.default().save(root / "m")  # the default tokenizer stands for the model's own
    (root / "m" / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": TILE, "width": TILE}, "max_image_tiles": 4})
    )
    rng = np.random.default_rng(0)
    for name, (w, h) in {"square.png": (30, 30), "wide.jpg": (200, 20)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / name)
    return root


def test_build_save_load_round_trip(model_dir):
    model = omnilm.load(model_dir / "m")
    assert type(model).__name__ == "MllamaModel"
    assert model.language_model.model.layers[1].cross_attn_attn_gate.item() == 0.5


def test_generate_with_an_image(model_dir, capsys):
    m = model_dir
    rc, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        m / "m",
        "--image",
        m / "square.png",
        "--prompt",
        "<|image|>hi",
        "--max-new-tokens",
        3,
    )
    assert rc == 0, err


def test_more_images_than_markers(model_dir, capsys):
    m = model_dir
    rc, _, err = run_cli(
        capsys,
        "generate",
        "--model",
        m / "m",
        "--image",
        m / "square.png",
        "--image",
        m / "square.png",
        "--prompt",
        "<|image|>hi",
    )
    assert_one_line_error(rc, err, "1 <|image|> markers but 2 images")


def test_aspect_ratio_outside_the_supported_list(model_dir, capsys):
    m = model_dir  # 200 x 20 wants a 1 x 4 grid; the model supports up to 2 x 2
    rc, _, err = run_cli(
        capsys, "generate", "--model", m / "m", "--image", m / "wide.jpg", "--prompt", "<|image|>hi"
    )
    assert_one_line_error(rc, err, "1x4", "supported aspect ratios")


def test_processor_tiles_over_max_num_tiles(model_dir, capsys, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir / "m", d)
    (d / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": TILE, "width": TILE}, "max_image_tiles": 6})
    )
    rc, _, err = run_cli(
        capsys, "generate", "--model", d, "--image", model_dir / "square.png", "--prompt", "<|image|>hi"
    )
    assert_one_line_error(rc, err, "max_image_tiles 6", "max_num_tiles 4")
