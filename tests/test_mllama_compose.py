"""`omnilm compose --fusion cross-attention`: fresh gated cross-attention layers between a Llama and
a SigLIP tower; with the gates at 0 the composed model's logits equal the text model's exactly."""

import pytest
import torch
from safetensors.torch import load_file
from test_cli_errors import make_parts

import omnilm
from omnilm.cli import main

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("xparts")
    make_parts(root)  # tiny random Llama (2 layers, vocab 2048) and SigLIP (32 px)
    rc = main(
        ["compose", "--fusion", "cross-attention", "--every", "1", "--text", str(root / "llama"),
         "--vision", str(root / "siglip"), "--out", str(root / "x")]
    )  # fmt: skip
    assert rc in (0, None)
    return root


def test_gates_at_zero_give_the_text_models_logits_exactly(composed):
    text = omnilm.load(composed / "llama")
    model = omnilm.load(composed / "x")
    assert type(model).__name__ == "MllamaModel"
    assert model.config.cross_attention.layers == [1, 3]  # a new layer after each of the 2 text layers
    llama = load_file(composed / "llama" / "model.safetensors")
    assert torch.equal(
        model.language_model.model.layers[2].mlp.up_proj.weight, llama["model.layers.1.mlp.up_proj.weight"]
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 2048, (2, 9), generator=g)
    pixels = torch.randn(2, 1, 3, 32, 32, generator=g)  # one image per prompt, every token sees it
    with torch.no_grad():
        ref = text(input_ids=ids).logits
        out = model(input_ids=ids, pixel_values=pixels).logits
        assert torch.equal(out[..., : ref.shape[-1]], ref)
        for layer in (model.language_model.model.layers[i] for i in (1, 3)):
            layer.cross_attn_attn_gate.fill_(0.5)
            layer.cross_attn_mlp_gate.fill_(0.5)
        moved = model(input_ids=ids, pixel_values=pixels).logits
    assert (moved[..., : ref.shape[-1]] - ref).abs().max() > 1e-3  # the cross-attention path is live


def test_every_out_of_range_is_a_one_line_error(composed, tmp_path, capsys):
    rc = main(
        ["compose", "--fusion", "cross-attention", "--every", "3", "--text", str(composed / "llama"),
         "--vision", str(composed / "siglip"), "--out", str(tmp_path / "y")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--every 3" in err


def test_generate_on_the_composed_model(composed, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray((np.indices((40, 30)).sum(0) * 5 % 256).astype(np.uint8)).convert("RGB").save(img)
    args = [
        "generate",
        "--model",
        str(composed / "x"),
        "--prompt",
        "<|image|> what is it",
        "--max-new-tokens",
        "4",
    ]
    rc = main(args + ["--image", str(img)])
    out, err = capsys.readouterr()
    assert rc in (0, None), err
    rc = main(args + ["--image", str(img), "--image", str(img)])
    err = capsys.readouterr().err
    assert rc == 2 and "1 <|image|> markers but 2 images" in err
