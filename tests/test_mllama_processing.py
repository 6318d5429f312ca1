"""Mllama preprocessing equals transformers' (PIL backend) on real decoded PNG/JPEG images of
several aspect ratios; the cross-attention mask equals MllamaProcessor's for multi-image prompts."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.mllama import processing_mllama
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from omnilm.errors import MediaError
from omnilm.processing.mllama import MllamaImageProcessor, cross_attention_mask

# (width, height): square, wide, tall, very wide (downscale), tiny (upscale), 2x2 grid
SIZES = [(64, 64), (130, 40), (37, 120), (400, 50), (9, 13), (90, 80)]
TILE = 32


def write_images(root, fmt):
    g = np.random.default_rng(0)
    paths = []
    for w, h in SIZES:
        y, x = np.mgrid[0:h, 0:w]
        a = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * y) % 256], -1)
        a = (a + g.integers(0, 40, a.shape)).clip(0, 255).astype(np.uint8)  # gradients plus noise
        p = root / f"im_{w}x{h}.{fmt.lower()}"
        Image.fromarray(a).save(p, format=fmt)
        paths.append(p)
    return paths


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_pixel_values_ids_and_masks_equal_transformers(tmp_path, fmt):
    paths = write_images(tmp_path, fmt)
    ours = MllamaImageProcessor.from_dict({"size": {"height": TILE, "width": TILE}, "max_image_tiles": 4})
    ref_proc = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4)
    # a batch of two prompts with 4 and 2 images (the second padded to 4)
    batch = [paths[:4], paths[4:]]
    out = ours(batch)
    decoded = [[Image.open(p).convert("RGB") for p in row] for row in batch]
    ref = ref_proc(decoded, return_tensors="pt")
    assert out["pixel_values"].shape == ref["pixel_values"].shape
    assert torch.allclose(out["pixel_values"], ref["pixel_values"], atol=1e-6)
    assert out["aspect_ratio_ids"].tolist() == ref["aspect_ratio_ids"].tolist()
    assert out["aspect_ratio_mask"].tolist() == ref["aspect_ratio_mask"].tolist()
    assert out["num_tiles"] == ref["num_tiles"]
    assert len(set(out["aspect_ratio_ids"].flatten().tolist())) >= 4  # several grids exercised


def test_cross_attention_mask_equals_transformers():
    IMG = 99
    prompts = [
        [1, IMG, 5, 6, IMG, 7, 8, 9],  # two images, text between
        [1, IMG, IMG, 5, 6, 7],  # consecutive markers share the text after them
        [1, 4, 4, IMG, 5, 0, 0, 0],  # text before the image, right padding
    ]
    tiles = [[2, 4], [1, 3], [4]]
    ours = cross_attention_mask(prompts, tiles, IMG, 4, 8)
    sparse = [processing_mllama.get_cross_attention_token_mask(p, IMG) for p in prompts]
    ref = processing_mllama.convert_sparse_cross_attention_mask_to_dense(sparse, tiles, 4, 8)
    assert ours.tolist() == ref.tolist()


def test_more_images_than_markers_is_an_error():
    with pytest.raises(MediaError, match="1 <\\|image\\|> markers but 2 images"):
        cross_attention_mask([[1, 99, 5]], [[1, 1]], 99, 4, 3)


def test_unsupported_aspect_ratio_is_an_error(tmp_path):
    p = write_images(tmp_path, "PNG")[3]  # 400 x 50 wants a 1 x 4 grid
    proc = MllamaImageProcessor(tile_size=TILE, max_num_tiles=4, supported_aspect_ratios=[[1, 1], [2, 2]])
    with pytest.raises(MediaError, match="not among the supported aspect ratios"):
        proc([p])


def test_prompt_markers_and_bos_as_transformers_places_them():
    from omnilm.processing.mllama import MllamaProcessor
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    proc = MllamaProcessor(tok, MllamaImageProcessor(tile_size=TILE), image_token_id=2048)
    bos = tok.bos_token_id
    # transformers' build_string_from_input: leading markers stay before <|begin_of_text|>
    assert proc.encode("<|image|><|image|>hi")[:3] == [2048, 2048, bos]
    ids = proc.encode("a <|image|> b")
    assert ids[0] == bos and ids.count(2048) == 1 and ids[-1] != 2048


def test_processor_equals_transformers_mllama_processor(tmp_path):
    """The whole processor against transformers' MllamaProcessor on one tokenizer: three images of
    different grids, two of them consecutive markers. transformers' tokenizer post-processor adds a
    second <|begin_of_text|> in front of the one the processor writes; apart from it, ids and masks
    are equal."""
    import transformers

    from omnilm.processing.mllama import MllamaProcessor
    from omnilm.tokenizers.text import TextTokenizer

    tok = TextTokenizer.default()
    tok.save(tmp_path)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"), bos_token=tok.id_to_token(tok.bos_token_id)
    )
    ref_proc = transformers.MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": TILE, "width": TILE}), tokenizer=hf_tok
    )
    ours_proc = MllamaProcessor(tok, MllamaImageProcessor(tile_size=TILE), tok.image_token_id)
    paths = write_images(tmp_path, "JPEG")
    images = [paths[1], paths[2], paths[5]]
    text = "describe <|image|> and <|image|><|image|> then"
    ref = ref_proc(text=text, images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")
    ours = ours_proc(text=text, images=images)
    assert ref["input_ids"][0, :2].tolist() == [tok.bos_token_id] * 2
    assert ours["input_ids"].tolist() == ref["input_ids"][:, 1:].tolist()
    assert ours["cross_attention_mask"].tolist() == ref["cross_attention_mask"][:, 1:].tolist()
    for key in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.allclose(ours[key].float(), ref[key].float(), atol=1e-6), key
