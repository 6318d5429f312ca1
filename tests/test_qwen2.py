"""OmniLM's decoder against transformers' Qwen2ForCausalLM on tiny random configs (q/k/v bias, tied and
untied heads, per-layer sliding window), through omnilm.load / save_pretrained."""

import json

import pytest
import torch

import omnilm
from omnilm.config import get_preset
from omnilm.plan import count_params

transformers = pytest.importorskip("transformers")


def tiny_qwen2(tmp_path, sliding=False, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=tie,
        use_sliding_window=sliding,
        sliding_window=6,  # far shorter than the prompts, so the window changes every later position
        max_window_layers=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and ones the norms: move both so a dropped one shows
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    return ref, tmp_path / "hf"


@pytest.mark.parametrize("sliding,tie", [(False, True), (True, False)])
def test_logits_match_transformers(tmp_path, sliding, tie):
    ref, path = tiny_qwen2(tmp_path, sliding, tie)
    model = omnilm.load(path)
    assert model.language_model.cfg.layer_types == (
        ["full_attention", "sliding_attention", "sliding_attention"] if sliding else None
    )
    ids = torch.randint(3, 320, (2, 40))
    with torch.no_grad():
        expected = ref(ids).logits
        got = model(input_ids=ids).logits
    assert (got - expected).abs().max() <= 1e-4
    # the padded path (explicit mask) agrees too: left-pad row 0 by 5
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


@pytest.mark.parametrize("sliding", [False, True])
def test_greedy_12_tokens_match_transformers(tmp_path, sliding):
    ref, path = tiny_qwen2(tmp_path, sliding)
    model = omnilm.load(path)
    ids = torch.randint(3, 320, (1, 9))
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, min_new_tokens=12)
    got = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(got, expected)


@pytest.mark.parametrize("sliding", [False, True])
def test_save_pretrained_loads_in_transformers(tmp_path, sliding):
    ref, path = tiny_qwen2(tmp_path, sliding, tie=not sliding)
    model = omnilm.load(path)
    model.save_pretrained(tmp_path / "out")
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["model_type"] == "qwen2" and hf["use_sliding_window"] is sliding
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 320, (1, 30))
    with torch.no_grad():
        assert (back(ids).logits - ref(ids).logits).abs().max() <= 1e-4


def test_built_preset_saves_as_qwen2(tmp_path):
    cfg = get_preset("qwen2.5-0.5b")
    d = cfg.decoder
    d.vocab_size, d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads = 320, 64, 2, 4, 2
    d.intermediate_size, d.head_dim = 96, 16
    model = omnilm.build(cfg)
    model.save_pretrained(tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 320, (1, 12))
    with torch.no_grad():
        assert (back(ids).logits - model(input_ids=ids).logits).abs().max() <= 1e-4


def test_qwen25_presets_have_the_published_sizes():
    # published sizes: the Qwen2.5 model cards' "Number of Parameters" (tied heads counted once),
    # and by hand for 0.5B: 24 layers x 4,984,960 + 151,936 x 896 + 896 (final norm)
    per_layer = 896 * 896 * 2 + 896 * 128 * 2 + 896 + 128 * 2 + 3 * 896 * 4864 + 2 * 896
    assert count_params(get_preset("qwen2.5-0.5b"))["total"] == 24 * per_layer + 151936 * 896 + 896
    assert count_params(get_preset("qwen2.5-0.5b"))["total"] == 494_032_768
    assert count_params(get_preset("qwen2.5-1.5b"))["total"] == 1_543_714_304
    assert count_params(get_preset("qwen2.5-3b"))["total"] == 3_085_938_688
    assert count_params(get_preset("qwen2.5-7b"))["total"] == 7_615_616_512


def test_sliding_window_batch_equals_rows_alone(tmp_path):
    # rows of different lengths decode in one engine batch; the window must follow each row's own slots
    from omnilm.generation import Engine, GenerationConfig

    _, path = tiny_qwen2(tmp_path, sliding=True)
    model = omnilm.load(path)
    prompts = [torch.randint(3, 320, (11,)).tolist(), torch.randint(3, 320, (4,)).tolist()]
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=[], logprobs=0)

    def run(rows):
        engine = Engine(model, max_batch=2)
        reqs = [engine.submit(r, cfg) for r in rows]
        while engine.has_work():
            engine.step()
        return [[ev.logprob for ev in r.events()] for r in reqs]

    both = run(prompts)
    for row, prompt in enumerate(prompts):
        (alone,) = run([prompt])
        assert max(abs(x - y) for x, y in zip(both[row], alone)) < 1e-4


def test_lora_step_trains(tmp_path):
    from lora_step import lora_steps_lower_the_loss

    _, path = tiny_qwen2(tmp_path, sliding=True)
    ids = torch.randint(3, 320, (2, 24))
    lora_steps_lower_the_loss(omnilm.load(path), input_ids=ids, labels=ids)


def test_sparse_configs_take_transformers_defaults():
    # Hub configs (Qwen2-Audio's text_config, Emu3's) list only what differs from the config class
    from omnilm.convert.emu3 import emu3_config_from_hf
    from omnilm.convert.qwen2 import qwen2_decoder_config_from_hf

    d = qwen2_decoder_config_from_hf(
        {"model_type": "qwen2", "vocab_size": 156032, "intermediate_size": 11008}
    )
    ref = transformers.Qwen2Config(vocab_size=156032, intermediate_size=11008)
    assert (d.vocab_size, d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads) == (
        156032, ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads
    )  # fmt: skip
    assert (d.norm_eps, d.rope_theta, d.max_seq_len) == (
        ref.rms_norm_eps,
        10000.0,
        ref.max_position_embeddings,
    )
    cfg, vq, _ = emu3_config_from_hf({"text_config": {}, "vq_config": {}, "vocabulary_map": {}})
    ref = transformers.Emu3TextConfig()
    assert (cfg.decoder.vocab_size, cfg.decoder.num_kv_heads, cfg.decoder.rope_theta) == (
        ref.vocab_size, ref.num_key_value_heads, ref.rope_parameters["rope_theta"]
    )  # fmt: skip
    assert vq.codebook_size == transformers.Emu3VQVAEConfig().codebook_size


def test_hostile_qwen2_config_is_refused_before_building(tmp_path):
    """The Qwen2 loader shares the Llama loader's checks: a config claiming 10^7 layers is one
    typed error at once, not a multi-gigabyte build."""
    _, path = tiny_qwen2(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 10**7
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(omnilm.errors.OmniLMError, match="config.json"):
        omnilm.load(path)
