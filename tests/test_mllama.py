"""Llama-3.2-Vision (Mllama): logits, save/load and cached generation equal transformers' on tiny
random configs with every gate away from zero."""

import pytest
import torch
import transformers

import omnilm
from omnilm.errors import CheckpointError, ConfigError

VOCAB = 256
IMAGE = VOCAB  # <|image|> is the first of the 8 embedding rows past the head's vocabulary
TILE = 20  # 5 x 5 patches of 4 px + class token = 26 tokens a tile (not a multiple of 8, as 1025)
TILES = 4


def hf_config():
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_global_layers=2,
        attention_heads=4,
        image_size=TILE,
        patch_size=4,
        max_num_tiles=TILES,
        intermediate_layers_indices=[0, 2],
        vision_output_dim=96,
        norm_eps=1e-5,
    )
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        cross_attention_layers=[1, 3],
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)


GATES = ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")


def perturb(model, seed=0):
    """Every parameter moved away from its init (gates included: transformers starts them at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] in GATES:
                p.copy_(0.3 + 0.5 * torch.rand(p.shape, generator=g))
            elif p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb(transformers.MllamaForConditionalGeneration(hf_config()).eval())
    path = tmp_path_factory.mktemp("mllama")
    model.save_pretrained(path)
    return path, model


def image_inputs(ratios, seed=0):
    """pixel_values (1, N, 4, 3, TILE, TILE) with padding tiles zero, aspect_ratio ids and mask."""
    supported = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    g = torch.Generator().manual_seed(seed)
    N = len(ratios)
    pv = torch.zeros(1, N, TILES, 3, TILE, TILE)
    ids = torch.zeros(1, N, dtype=torch.long)
    mask = torch.zeros(1, N, TILES, dtype=torch.long)
    mask[:, :, 0] = 1
    for i, r in enumerate(ratios):
        n = r[0] * r[1]
        pv[0, i, :n] = torch.randn(n, 3, TILE, TILE, generator=g)
        ids[0, i] = supported.index(list(r)) + 1
        mask[0, i, :n] = 1
    return pv, ids, mask


def prompt(n_images, length=12, seed=0):
    """bos, then text with an <|image|> marker per image, and the dense cross-attention mask."""

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (length,), generator=g)
    ids[0] = 1
    for i in range(n_images):
        ids[2 + 4 * i] = IMAGE
    return ids[None], ids


def inputs(ratios, length=12, seed=0):
    from omnilm.processing.mllama import cross_attention_mask

    ids, flat = prompt(len(ratios), length, seed)
    pv, ar_ids, ar_mask = image_inputs(ratios, seed)
    tiles = [[r[0] * r[1] for r in ratios]]
    cam = cross_attention_mask([flat.tolist()], tiles, IMAGE, TILES, length)
    return dict(
        input_ids=ids,
        pixel_values=pv,
        aspect_ratio_ids=ar_ids,
        aspect_ratio_mask=ar_mask,
        cross_attention_mask=cam,
    )


@pytest.mark.parametrize("ratios", [[(1, 1)], [(1, 2)], [(2, 2)], [(2, 1), (1, 3)]], ids=str)
def test_logits_equal_transformers(hf_dir, ratios):
    path, hf = hf_dir
    model = omnilm.load(path)
    x = inputs(ratios)
    with torch.no_grad():
        ref = hf(**x).logits
        out = model(**x).logits
    assert out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-4


def test_text_only_prompt_equals_transformers(hf_dir):
    path, hf = hf_dir
    model = omnilm.load(path)
    ids = prompt(0)[0]
    with torch.no_grad():
        assert (model(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max() < 1e-4


def test_save_pretrained_loads_in_transformers(hf_dir, tmp_path):
    path, hf = hf_dir
    model = omnilm.load(path)
    model.save_pretrained(tmp_path / "out")
    back = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    again = omnilm.load(tmp_path / "out")
    x = inputs([(1, 3)])
    with torch.no_grad():
        ref = hf(**x).logits
        assert (back(**x).logits - ref).abs().max() < 1e-5
        assert (again(**x).logits - ref).abs().max() < 1e-4


def test_sharded_and_runtime_layout_checkpoints_load(hf_dir, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    path, hf = hf_dir
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5's in-memory names (model.language_model.*, lm_head.*) in one file
    d = tmp_path / "runtime"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    state = {}
    for k, v in load_file(path / "model.safetensors").items():
        k = k.replace("language_model.lm_head.", "lm_head.").replace(
            "language_model.model.", "model.language_model."
        )
        state[
            k.replace("vision_model.", "model.vision_model.", 1) if k.startswith("vision_model.") else k
        ] = v
    state = {("model." + k if k.startswith("multi_modal_projector.") else k): v for k, v in state.items()}
    save_file(state, d / "model.safetensors")
    x = inputs([(2, 1)])
    with torch.no_grad():
        ref = hf(**x).logits
        for p in (tmp_path / "sharded", d):
            assert (omnilm.load(p)(**x).logits - ref).abs().max() < 1e-4
    assert json.loads((d / "config.json").read_text())["model_type"] == "mllama"


def test_strict_keys(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = hf_dir
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text((path / "config.json").read_text())
    state = load_file(path / "model.safetensors")
    state.pop(next(k for k in state if "cross_attn_mlp_gate" in k))
    save_file(state, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="cross_attn_mlp_gate"):
        omnilm.load(d)


def test_greedy_16_tokens_equal_transformers_with_cached_cross_attention(hf_dir):
    path, hf = hf_dir
    model = omnilm.load(path)
    x = inputs([(2, 2)])
    calls = []
    model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    out = model.generate(**x, max_new_tokens=16, eos_token_id=[])
    ref = hf.generate(**x, max_new_tokens=16, do_sample=False, eos_token_id=None, min_new_tokens=16)
    assert out.tolist() == ref.tolist()
    assert len(calls) == 1  # the vision encoder ran once, at prefill
    import gc

    gc.collect()  # the private engine of generate() is gone, and with it the request's image state
    assert all(ref() is None for ref in model._decode_states[0] if ref is not None)


def test_engine_batch_of_different_image_counts_equals_each_alone(hf_dir):
    """Continuous batching: requests with 2, 1 and 0 images decode together, each row getting its
    own cross-attention state, and every request gets the tokens it gets alone."""
    from omnilm.generation import Engine, GenerationConfig

    path, _ = hf_dir
    model = omnilm.load(path)
    reqs = [inputs([(2, 1), (1, 1)], length=12, seed=2), inputs([(1, 2)], length=9, seed=1)]
    text_only = prompt(0, length=7, seed=3)[1]
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=[])

    def media(x):
        return {k: v for k, v in x.items() if k != "input_ids"}

    alone = [
        model.generate(**x, max_new_tokens=10, eos_token_id=[])[0, x["input_ids"].shape[1] :].tolist()
        for x in reqs
    ]
    alone.append(model.generate(text_only[None], max_new_tokens=10, eos_token_id=[])[0, 7:].tolist())
    engine = Engine(model, max_batch=4)
    batch = [engine.submit(x["input_ids"][0].tolist(), cfg, media(x)) for x in reqs]
    batch.append(engine.submit(text_only.tolist(), cfg))
    while engine.has_work():
        engine.step()
    assert [r.output for r in batch] == alone
    assert len({tuple(a) for a in alone}) == 3
    # prompts prefilled in chunks of 5 tokens (interleaved with the others' decoding): each chunk
    # reads its rows of the cross-attention mask
    engine = Engine(model, max_batch=4, prefill_chunk=5)
    chunked = [engine.submit(x["input_ids"][0].tolist(), cfg, media(x)) for x in reqs]
    while engine.has_work():
        engine.step()
    assert [r.output for r in chunked] == alone[:2]
    # text-only prompts of one length first (the engine prefills them together, one forward), then
    # the image ones
    other = prompt(0, length=7, seed=4)[1]
    alone.append(model.generate(other[None], max_new_tokens=10, eos_token_id=[])[0, 7:].tolist())
    engine = Engine(model, max_batch=4)
    mixed = [engine.submit(ids.tolist(), cfg) for ids in (text_only, other)]
    mixed += [engine.submit(x["input_ids"][0].tolist(), cfg, media(x)) for x in reqs]
    while engine.has_work():
        engine.step()
    assert [r.output for r in mixed] == [alone[2], alone[3], alone[0], alone[1]]
    # prefix caching: a text-only prompt seen before reuses its pages (40 tokens: 2 full pages of 16);
    # image prompts never do
    long = prompt(0, length=40, seed=5)[1]
    long_alone = model.generate(long[None], max_new_tokens=10, eos_token_id=[])[0, 40:].tolist()
    engine = Engine(model, max_batch=4, prefix_caching=True)
    for _ in range(2):
        again = [
            engine.submit(long.tolist(), cfg),
            engine.submit(reqs[0]["input_ids"][0].tolist(), cfg, media(reqs[0])),
        ]
        while engine.has_work():
            engine.step()
        assert [r.output for r in again] == [long_alone, alone[0]]


def test_bad_image_inputs_are_one_line_errors(hf_dir):
    path, _ = hf_dir
    model = omnilm.load(path)
    x = inputs([(1, 2)])
    with pytest.raises(ConfigError, match="aspect_ratio_ids"):
        model(**{**x, "aspect_ratio_ids": torch.tensor([[9]])})
    with pytest.raises(ConfigError, match="max_num_tiles"):
        model(**{**x, "pixel_values": torch.zeros(1, 1, 5, 3, TILE, TILE)})


def test_plan_counts_llama_3_2_11b_vision():
    from omnilm.config import get_preset
    from omnilm.plan import count_params

    n = count_params(get_preset("llama-3.2-11b-vision"))  # built on the meta device
    assert abs(n["total"] - 10.67e9) / 10.67e9 < 0.01, n
    assert 0.85e9 < n["encoders"] < 0.95e9  # vision encoder and projector
    assert n["other"] == 0  # every cross-attention parameter lands in a named group
