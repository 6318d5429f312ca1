"""OmniLM's decoder against transformers' LlamaForCausalLM on tiny random configs, through the
production conversion code (omnilm.load / save_pretrained)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import omnilm
from omnilm.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def tiny_llama(tmp_path, tie=True, kv_heads=2, rope_scaling=True, seed=0):
    torch.manual_seed(seed)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if rope_scaling:  # shrunk llama3 scaling so every frequency band is exercised at small head_dim
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    cfg = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        rope_parameters=rope,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    ref = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a skipped norm would show
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


@pytest.mark.parametrize("tie,kv_heads,scaling", [(True, 2, True), (False, 8, False), (True, 1, True)])
def test_logits_match_transformers(tmp_path, tie, kv_heads, scaling):
    ref, path = tiny_llama(tmp_path, tie, kv_heads, scaling)
    model = omnilm.load(path)
    ids = torch.randint(3, 320, (2, 40))
    with torch.no_grad():
        expected = ref(ids).logits
    got = model(input_ids=ids).logits
    assert got.shape == (2, 40, 320)
    assert (got - expected).abs().max() <= 1e-4


def test_greedy_32_tokens_match_transformers(tmp_path):
    ref, path = tiny_llama(tmp_path)
    model = omnilm.load(path)
    ids = torch.randint(3, 320, (1, 12))
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, min_new_tokens=32)
    got = model.generate(ids, max_new_tokens=32, eos_token_id=[])
    assert got.shape == (1, 44)
    assert torch.equal(got, expected)


def test_cache_decode_equals_recomputation(tmp_path):
    _, path = tiny_llama(tmp_path)
    model = omnilm.load(path)
    ids = torch.randint(3, 320, (1, 10))
    out = model.generate(ids, max_new_tokens=16, eos_token_id=[])
    # every generated token is the argmax of a full forward pass over what precedes it
    logits = model(input_ids=out[:, :-1]).logits
    assert torch.equal(logits[:, 9:].argmax(-1), out[:, 10:])


def test_left_padded_batch_equals_each_row_alone(tmp_path):
    _, path = tiny_llama(tmp_path)
    model = omnilm.load(path)
    a = torch.randint(3, 320, (1, 14))
    b = torch.randint(3, 320, (1, 9))
    batch = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    batch[0], mask[0] = a[0], 1
    batch[1, 5:], mask[1, 5:] = b[0], 1
    out = model.generate(batch, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    alone_a = model.generate(a, max_new_tokens=12, eos_token_id=[])
    alone_b = model.generate(b, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out[0, 14:], alone_a[0, 14:])
    assert torch.equal(out[1, 14:], alone_b[0, 9:])
    # the padded forward pass gives the same logits as the row alone at its real positions
    full = model(input_ids=batch, attention_mask=mask).logits
    assert (full[1, 5:] - model(input_ids=b).logits[0]).abs().max() <= 1e-4


def test_save_pretrained_round_trip_is_identical(tmp_path):
    _, path = tiny_llama(tmp_path, tie=False)
    model = omnilm.load(path)
    model.save_pretrained(tmp_path / "out")
    a, b = load_file(path / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(3, 320, (1, 8))
    assert (again(ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4


def test_strict_loading_names_bad_keys(tmp_path):
    _, path = tiny_llama(tmp_path)
    state = load_file(path / "model.safetensors")
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    del state["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(state, path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"missing keys model\.layers\.1\.mlp\.up_proj\.weight.*unexpected keys model\.layers\.0\.extra",
    ):
        omnilm.load(path)


def test_shape_mismatch_and_pickle_are_refused(tmp_path):
    _, path = tiny_llama(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        omnilm.load(path)
    pickled = tmp_path / "pkl"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        omnilm.load(pickled)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        omnilm.load(tmp_path / "missing")
