"""`make test-vllm`: every family OmniLM exports, served by vLLM's CPU build, against OmniLM's own tokens.

Two halves in two environments (vLLM pins its own transformers, so it lives in its own venv):
  prepare  (OmniLM's venv)  build each family's export the way users make it (build/compose + save_pretrained),
                            with weights hot enough that greedy decoding does not repeat one token; record
                            OmniLM's greedy tokens for 4 prompts; check transformers loads the directory
                            with equal logits
  serve    (vLLM's venv)    one process per row: vllm.LLM(dir) offline greedy on the same prompts, its
                            tokenizer's ids for the prompt text, and its chat template through LLM.chat
The table (family, dtype, loads, greedy identical, tokenizer / chat template, transformers, reason for any
no) goes to stdout and, as Markdown, to --markdown.

    python scripts/test_vllm.py --vllm-python .venv-vllm/bin/python [--only llama,llava] [--keep DIR]

Rows are a table (FAMILIES): a new family adds one builder that writes its export and returns its prompts.
vLLM's CPU attention needs head_dim >= 32, so these models use 32 (the `tiny` preset's 16 cannot be served).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

HOT_STD = 0.2  # init std that makes greedy continuations varied (0.02 gives near-flat logits)
NEW_TOKENS = 12
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 plus 7?"}]
PROMPTS = ["The quick brown fox", "Describe the image.", "What is 12 plus 7?", "Once upon a time, in a"]


@dataclass
class Row:
    family: str
    dtype: str
    build: object  # (out_dir, dtype) -> list of prompt dicts {"text", "image"(path|None)}
    compute: str | None = None  # the dtype both sides run in, where `dtype` names a quantization scheme
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return re.sub(r"[^\w.-]+", "_", f"{self.family}-{self.dtype}").strip("_")


class NotExported(Exception):
    """This branch has no exporter for the family (the reason goes in the table)."""


# ---- exports (OmniLM side) ------------------------------------------------------------------------------


def _decoder(**kw):
    from omnilm.config import DecoderConfig, RopeScaling

    base = dict(
        vocab_size=2048,  # the bundled tokenizer's
        hidden_size=128,
        num_layers=2,
        num_heads=4,  # head_dim 32: vLLM CPU's smallest
        num_kv_heads=2,
        intermediate_size=256,
        max_seq_len=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=HOT_STD,
        tie_embeddings=True,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=256
        ),
    )
    return DecoderConfig(**{**base, **kw})


def _heat(model, seed=0):
    """Weights away from init: matrices ~N(0, HOT_STD), vectors (norms, biases) perturbed around theirs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * HOT_STD if p.dim() > 1 else p + 0.1 * noise)
    return model


def build_llama(out: Path, dtype: str):
    """`omnilm.build` (tied embeddings, Llama-3 rope scaling) + save_pretrained."""
    import omnilm
    from omnilm.config import ModelConfig

    model = _heat(omnilm.build(ModelConfig(decoder=_decoder())))
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return [{"text": t, "image": None} for t in PROMPTS]


def build_qwen2(out: Path, dtype: str):
    """A Qwen2 decoder (q/k/v bias, untied head) from `omnilm.build` + save_pretrained."""
    import omnilm
    from omnilm.config import ModelConfig

    model = _heat(
        omnilm.build(ModelConfig(decoder=_decoder(qkv_bias=True, tie_embeddings=False, rope_scaling=None)))
    )
    assert model.hf_format == "qwen2"
    model.to(getattr(torch, dtype)).save_pretrained(out)
    return [{"text": t, "image": None} for t in PROMPTS]


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


def build_qwen2_audio(out: Path, dtype: str):
    """A transformers-written Qwen2-Audio (Whisper-style encoder, Qwen2 text, own BPE with Qwen's audio
    tokens), heated, then `omnilm.load` + save_pretrained: the production path for a Hub checkpoint."""
    import numpy as np
    import tokenizers
    import transformers

    import omnilm

    src = out.parent / f"{out.name}-src"
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        PROMPTS * 20 + ["what is the sound in this audio clip", "a dog barks twice"] * 20, trainer
    )
    src.mkdir(parents=True, exist_ok=True)
    tok.save(str(src / "tokenizer.json"))
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(src / "tokenizer.json"), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    fe = transformers.WhisperFeatureExtractor(feature_size=128)
    transformers.Qwen2AudioProcessor(feature_extractor=fe, tokenizer=hf_tok).save_pretrained(src)
    fe.save_pretrained(src)  # transformers 5 nests it in processor_config.json; OmniLM reads this file
    torch.manual_seed(0)
    cfg = transformers.Qwen2AudioConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128, num_mel_bins=128),
        text_config=dict(
            model_type="qwen2", vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.token_to_id("<|endoftext|>"),
        ),
        audio_token_index=tok.token_to_id("<|AUDIO|>"),
    )  # fmt: skip
    _heat(transformers.Qwen2AudioForConditionalGeneration(cfg)).save_pretrained(src)
    omnilm.load(src).to(getattr(torch, dtype)).save_pretrained(out)
    prompts = []
    for i, text in enumerate(PROMPTS):
        audio = None
        if i != 2:  # three prompts with a clip, one text-only
            t = np.arange(int((1.0 + 0.5 * i) * 16000)) / 16000
            wave = np.sin(2 * np.pi * (200 + 80 * i) * t) * (0.5 + 0.4 * np.sin(2 * np.pi * 3 * t))
            audio = str(out.parent / f"{out.name}-audio{i}.npy")
            np.save(audio, (0.4 * wave).astype(np.float32))
        tag = "<|audio_bos|><|AUDIO|><|audio_eos|>" if audio else ""
        prompts.append({"text": tag + text, "image": None, "audio": audio})
    return prompts


def build_llava(out: Path, dtype: str):
    """`omnilm compose` of a Llama and a SigLIP tower (the production path), heated, then save_pretrained."""
    import numpy as np
    import transformers
    from PIL import Image

    import omnilm
    from omnilm.config import ModelConfig
    from omnilm.convert.compose import compose

    parts = out.parent / f"{out.name}-parts"
    _heat(omnilm.build(ModelConfig(decoder=_decoder(rope_scaling=None)))).save_pretrained(parts / "llama")
    siglip = transformers.SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    transformers.SiglipVisionModel(siglip).save_pretrained(parts / "siglip")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(parts / "siglip")
    model = compose(parts / "llama", vision=parts / "siglip", out=parts / "composed")
    _heat(model, seed=1).to(getattr(torch, dtype)).save_pretrained(out)
    prompts = []
    for i, text in enumerate(PROMPTS):
        image = None
        if i % 2 == 1 or i == 0:  # three prompts with an image, one text-only
            rgb = (np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")
            image = str(out.parent / f"{out.name}-image{i}.png")
            Image.fromarray(rgb).save(image)
        prompts.append({"text": ("<|image|>" if image else "") + text, "image": image})
    return prompts


def build_quantized(scheme: str, compute: str = "float32", activations: str | None = None):
    """The hot Llama (in `compute`, which the scales take) quantized by `omnilm.quant` (decoder linears)
    and written as a compressed-tensors directory by save_quantized, the `omnilm quantize` path;
    OmniLM's tokens come from loading it back."""

    def build(out: Path, dtype: str):
        import omnilm
        from omnilm.quant import quantize_model
        from omnilm.quant.io import save_quantized

        src = out.parent / f"{out.name}-src"
        prompts = build_llama(src, compute)
        model = omnilm.load(src)
        quantize_model(model, scheme, activations=activations)
        save_quantized(model, out, source=src)
        return prompts

    return build


class TransformersOnly(Exception):
    """vLLM cannot run this family at all; the row records transformers' check and the reason."""

    def __init__(self, transformers_result: str, reason: str):
        super().__init__(reason)
        self.transformers_result, self.reason = transformers_result, reason


def build_mllama(out: Path, dtype: str):
    """A transformers-written Mllama (gates away from zero), `omnilm.load` + save_pretrained; transformers
    reloads the export and its logits with a 2-tile image are compared with OmniLM's."""
    import transformers

    import omnilm
    from omnilm.processing.mllama import cross_attention_mask

    vocab, image_id, tile, tiles = 256, 256, 20, 4
    cfg = transformers.MllamaConfig(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_global_layers=2, attention_heads=4,
            image_size=tile, patch_size=4, max_num_tiles=tiles, intermediate_layers_indices=[0, 2],
            vision_output_dim=96, norm_eps=1e-5,
        ),
        text_config=dict(
            vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, cross_attention_layers=[1, 3], max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        ),
        image_token_index=image_id,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = _heat(transformers.MllamaForConditionalGeneration(cfg))
    with torch.no_grad():  # transformers starts the tanh gates at 0, which would hide the cross-attention
        for name, p in ref.named_parameters():
            if "gate" in name.split(".")[-1]:
                p.fill_(0.5)
    src = out.parent / f"{out.name}-src"
    ref.save_pretrained(src)
    omnilm.load(src).to(getattr(torch, dtype)).save_pretrained(out)
    back = transformers.MllamaForConditionalGeneration.from_pretrained(out).eval()
    ours = omnilm.load(out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, 12), generator=g)
    ids[0, 0], ids[0, 2] = 1, image_id
    pixel_values = torch.zeros(1, 1, tiles, 3, tile, tile)
    pixel_values[0, 0, :2] = torch.randn(2, 3, tile, tile, generator=g)
    inputs = dict(
        input_ids=ids,
        pixel_values=pixel_values,
        aspect_ratio_ids=torch.tensor([[2]]),  # (1, 2) tiles
        aspect_ratio_mask=torch.tensor([[[1, 1, 0, 0]]]),
        cross_attention_mask=cross_attention_mask([ids[0].tolist()], [[2]], image_id, tiles, 12),
    )
    with torch.no_grad():
        diff = (back(**inputs).logits - ours(**inputs).logits).abs().max().item()
    result = "yes" if diff <= 1e-4 else f"no: max |logit diff| {diff:.2g}"
    raise TransformersOnly(
        result,
        "vLLM 0.32.0 has no MllamaForConditionalGeneration (its registry lists it as removed after 0.10.2, with"
        " V0's encoder-decoder models); transformers loads the export",
    )


def not_on_this_branch(what):
    def build(out, dtype):
        raise NotExported(what)

    return build


FAMILIES = [
    Row("llama", "float32", build_llama),
    Row("llama", "bfloat16", build_llama),
    Row("llava", "float32", build_llava),
    # one row per family and dtype: a new family adds a builder that writes its export and returns prompts
    Row("qwen2", "float32", build_qwen2),
    Row("mllama", "float32", build_mllama),
    Row("qwen2_audio", "float32", build_qwen2_audio),
    # `omnilm quantize` exports; vLLM's CPU kernels decide the compute dtype of each (reasons in CAUSES)
    Row("compressed-tensors", "int8 (fp32)", build_quantized("int8"), "float32"),
    Row("compressed-tensors", "int8 W8A8 (fp32)", build_quantized("int8", activations="int8"), "float32"),
    Row("compressed-tensors", "fp8 (fp32)", build_quantized("fp8"), "float32"),
    Row("compressed-tensors", "int4 (fp32)", build_quantized("int4"), "float32"),
    Row("compressed-tensors", "int4 (bf16)", build_quantized("int4", "bfloat16"), "bfloat16"),
]


def omnilm_tokens(out: Path, prompts: list[dict]) -> list[dict]:
    """OmniLM's prompt ids and greedy tokens, from the exported directory (load + load_processor)."""
    from PIL import Image

    import omnilm

    model, proc = omnilm.load(out), omnilm.load_processor(out)
    import numpy as np

    for p in prompts:
        images = [Image.open(p["image"])] if p["image"] else None
        audio = [np.load(p["audio"])] if p.get("audio") else None
        batch = proc(text=p["text"], images=images, audio=audio)
        ids = batch["input_ids"]
        media = {
            k: v
            for k, v in batch.items()
            if k not in ("input_ids", "attention_mask", "loss_mask") and v is not None
        }
        new = model.generate(ids, max_new_tokens=NEW_TOKENS, **media)
        p["prompt_ids"] = ids[0].tolist()
        p["expected"] = new[0, ids.shape[1] :].tolist()
        # top-1 minus top-2 logit before each new token: how close to a tie greedy decoding was there
        with torch.no_grad():
            logits = model(input_ids=new, **media).logits[0].float()
        top2 = logits[ids.shape[1] - 1 : -1].topk(2, dim=-1).values
        p["margins"] = (top2[:, 0] - top2[:, 1]).tolist()
        p["omnilm_varied"] = len(set(p["expected"])) > 2
        if any(getattr(m, "activations", None) == "int8" for m in model.modules()):
            with vllm_activation_scale():
                alt = model.generate(ids, max_new_tokens=NEW_TOKENS, **media)
            p["expected_vllm_scale"] = alt[0, ids.shape[1] :].tolist()
    return prompts


@contextmanager
def vllm_activation_scale():
    """OmniLM's W8A8 with vLLM's per-token activation scale, amax / 127 (OmniLM and compressed-tensors take
    amax / 127.5, (qmax - qmin) / 2): a diagnostic that separates that convention from how vLLM reads the
    file's weights and scales. Not OmniLM's output; the table's greedy column stays OmniLM's own tokens."""
    from omnilm.quant.linear import QuantLinear

    def w8a8(self, x2):
        x_scale = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / 127.0  # (M, 1)
        xq = torch.round(x2.float() / x_scale).clamp(-128, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.weight.t())  # (M, N) int32
        return (acc.float() * x_scale * self.weight_scale.float().reshape(1, -1)).to(x2.dtype)

    own = QuantLinear._w8a8
    QuantLinear._w8a8 = w8a8
    try:
        yield
    finally:
        QuantLinear._w8a8 = own


def transformers_check(out: Path, prompts: list[dict]) -> str:
    """'yes' when transformers loads the directory (Auto classes) and its logits equal OmniLM's."""
    import transformers
    from PIL import Image

    import omnilm

    hf_cfg = json.loads((out / "config.json").read_text())
    model = omnilm.load(out)
    if hf_cfg["model_type"] == "llava":
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(out)
        proc = transformers.AutoProcessor.from_pretrained(out)
    elif hf_cfg["model_type"] == "qwen2_audio":
        hf = transformers.Qwen2AudioForConditionalGeneration.from_pretrained(out)
        proc = None
    else:
        hf = transformers.AutoModelForCausalLM.from_pretrained(out)
        proc = None
    hf.eval()
    worst = 0.0
    for p in prompts:
        ids = torch.tensor([p["prompt_ids"]])
        kw = {}
        if p.get("audio"):  # OmniLM's features for both: this compares the weights, not the processors
            import numpy as np

            batch = omnilm.load_processor(out)(text=p["text"], audio=[np.load(p["audio"])])
            kw = {k: batch[k] for k in ("input_features", "feature_attention_mask")}
        if p["image"]:
            kw["pixel_values"] = proc(text=p["text"], images=[Image.open(p["image"])], return_tensors="pt")[
                "pixel_values"
            ].to(model.dtype)
        with torch.no_grad():
            a = hf(input_ids=ids, **kw).logits.float()
            b = model(input_ids=ids, **kw).logits.float()
        worst = max(worst, (a - b).abs().max().item())
    tol = 1e-4 if model.dtype == torch.float32 else 5e-2
    if worst <= tol:
        return "yes"
    if model.dtype != torch.float32:  # how far bf16 alone moves transformers' own logits on these weights
        hf32 = type(hf).from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            kw = {k: v.float() if v.is_floating_point() else v for k, v in kw.items()}
            own = (hf32(input_ids=ids, **kw).logits.float() - a).abs().max().item()
        return f"no: max |logit diff| {worst:.2g} (transformers' own bf16 vs fp32: {own:.2g})"
    return f"no: max |logit diff| {worst:.2g}"


def prepare(row: Row, work: Path) -> dict | None:
    out = work / row.name
    try:
        prompts = row.build(out, row.dtype)
    except NotExported as e:
        row.result = {"reason": str(e)}
        return None
    except TransformersOnly as e:
        row.result = {"loads": "no", "greedy": "-", "tokenizer": "-", "chat": "-", "notes": [e.reason]}
        row.result["transformers"] = e.transformers_result
        return None
    prompts = omnilm_tokens(out, prompts)
    try:
        row.result["transformers"] = transformers_check(out, prompts)
    except Exception as e:  # any failure is a table entry, not a crash of the whole run
        row.result["transformers"] = f"no: {type(e).__name__}: {str(e)[:120]}"
    from omnilm.tokenizers.chat import render_chat
    from omnilm.tokenizers.text import TextTokenizer

    try:
        chat_ids = render_chat(CHAT, TextTokenizer.from_dir(out), add_generation_prompt=True)[0]
    except Exception:  # a family's own chat format (Qwen's ChatML): vLLM's side only checks it renders
        chat_ids = None
    case = {
        "dir": str(out),
        "dtype": row.compute or row.dtype,
        "prompts": prompts,
        "new_tokens": NEW_TOKENS,
        "chat_ids": chat_ids,
    }
    (out.parent / f"{out.name}.case.json").write_text(json.dumps(case, indent=1))
    return case


# ---- serving (vLLM side; runs in vLLM's venv without omnilm) -----------------------------------------


def serve(case_file: str) -> None:
    """One row in vLLM: prints a JSON result line `RESULT {...}`."""
    from vllm import LLM, SamplingParams

    case = json.loads(Path(case_file).read_text())
    result = {"loads": "no", "greedy": "no", "tokenizer": "no", "chat": "no", "notes": []}
    # vLLM's own tokenizer loader and chat template, which need no model: checked even when the model fails
    from vllm.tokenizers.registry import get_tokenizer

    try:
        tok = get_tokenizer(case["dir"])
    except Exception as e:
        result["notes"].append(f"no tokenizer: {_last_line(e)}")
        print("RESULT " + json.dumps(result), flush=True)
        return
    same_ids = all(
        tok.encode(p["text"]) == p["prompt_ids"]
        for p in case["prompts"]
        if not p["image"] and not p.get("audio")
    )
    result["tokenizer"] = "yes" if same_ids else "no"
    if not same_ids:
        result["notes"].append("vLLM's tokenizer gives other prompt ids")
    try:
        chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    except Exception as e:
        chat_ids = None
        result["notes"].append(f"no chat template: {_last_line(e)}")
    if case["chat_ids"] is None:  # the family's own format: rendering at all is the check
        case["chat_ids"] = chat_ids
    result["chat"] = "yes" if chat_ids is not None and chat_ids == case["chat_ids"] else "no"
    if chat_ids is not None and chat_ids != case["chat_ids"]:
        result["notes"].append("the chat template renders other ids than OmniLM's render_chat")
    try:
        llm = LLM(model=case["dir"], dtype=case["dtype"], max_model_len=512, enforce_eager=True, seed=0)
    except Exception as e:
        result["notes"].append(f"vLLM cannot load: {_last_line(e)}")
        print("RESULT " + json.dumps(result), flush=True)
        return
    result["loads"] = "yes"
    try:  # the chat endpoint's path: LLM.chat renders with the directory's template
        chat = llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=4))
        if list(chat[0].prompt_token_ids) != case["chat_ids"]:
            result["chat"] = "no"
            result["notes"].append("LLM.chat's prompt ids differ from OmniLM's render_chat")
    except Exception as e:
        result["chat"] = "no"
        result["notes"].append(f"chat: {_last_line(e)}")
    sp = SamplingParams(temperature=0.0, max_tokens=case["new_tokens"], ignore_eos=True, detokenize=False)
    inputs = []
    for p in case["prompts"]:
        item = {"prompt_token_ids": p["prompt_ids"]}
        if p["image"]:  # text prompt: vLLM's processor expands the image token itself
            from PIL import Image

            item = {"prompt": p["text"], "multi_modal_data": {"image": Image.open(p["image"]).convert("RGB")}}
        elif p.get("audio"):
            import numpy as np

            item = {"prompt": p["text"], "multi_modal_data": {"audio": (np.load(p["audio"]), 16000)}}
        inputs.append(item)
    try:
        outs = llm.generate(inputs, sp)
        got = [list(o.outputs[0].token_ids) for o in outs]
        same = [g == p["expected"] for g, p in zip(got, case["prompts"])]
        result["greedy"] = "yes" if all(same) else f"no ({sum(same)}/{len(same)})"
        if not all(same) and case["dtype"] != "float32":
            result["notes"].append("bf16 rounding differs between OmniLM's and vLLM's CPU kernels (fp32 row)")
        alt = [p.get("expected_vllm_scale") for p in case["prompts"]]
        if not all(same) and all(alt):
            n = sum(g == a for g, a in zip(got, alt))
            result["notes"].append(
                f"W8A8 activation scale: vLLM's CPU kernel takes amax / 127, OmniLM and compressed-tensors"
                f" amax / 127.5; with vLLM's convention OmniLM's greedy tokens equal vLLM's on {n}/{len(alt)}"
            )
        for g, p, ok in zip(got, case["prompts"], same):
            if not ok:
                first = next(i for i, (a, b) in enumerate(zip(g, p["expected"])) if a != b)
                result["notes"].append(
                    f"{p['text'][:24]!r}: first differs at new token {first} "
                    f"(OmniLM's top-2 logit gap there {p['margins'][first]:.3g})"
                )
        result["prompts_with_media"] = sum(1 for p in case["prompts"] if p["image"] or p.get("audio"))
    except Exception as e:
        result["notes"].append(f"generate: {_last_line(e)}")
    print("RESULT " + json.dumps(result), flush=True)


def _last_line(e: Exception) -> str:
    """The informative line of an exception (pydantic puts the reason on the line before its URL)."""
    lines = [ln.strip() for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("For further information")]
    return lines[-1][:300] if lines else type(e).__name__


def run_vllm(python: str, case_file: Path, log: Path) -> dict:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)  # vLLM's venv has its own transformers; omnilm is not needed there
    with open(log, "w") as f:  # vLLM logs to stdout: keep all of it, the RESULT line included
        proc = subprocess.run(
            [python, __file__, "--serve", str(case_file)],
            stdout=f,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    lines = log.read_text().splitlines()
    result = {"notes": [f"vLLM process exited {proc.returncode} without a result (see {log})"]}
    for line in lines:
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    # the root cause is in vLLM's log (often its worker process's), not in the exception LLM() raised
    notes = result.setdefault("notes", [])
    for marker, why in CAUSES.items():
        found = [ln.split("] ")[-1].strip() for ln in lines if marker in ln and not ln.startswith("RESULT ")]
        found = found or [n for n in notes if marker in n]  # raised in this process: already a note
        if not found:
            continue
        dead = ("vLLM cannot load", "chat: EngineDeadError", "generate: EngineDeadError", found[-1])
        notes[:] = [n for n in notes if not n.startswith(dead)]
        notes.append(
            f"vLLM: {found[-1].removeprefix('vLLM cannot load: ')[:200]}" + (f" ({why})" if why else "")
        )
        break
    return result


# a line of vLLM's log that names the root cause -> why, as read in vllm-cpu 0.32.0's source on the 2-core CPU
# VM (2026-11-30); the first marker found is reported
CAUSES = {
    "ModuleNotFoundError: No module named 'torchvision'": (
        "vLLM's llava.py imports pixtral.py, which imports transformers' PixtralImageProcessor, which"
        " imports torchvision at the top; PyPI's torchvision 0.28.0 is a CUDA build that imports only beside"
        " PyPI's CUDA build of torch 2.13.0, not beside torch 2.13.0+cpu: run `make test-vllm-vision`"
    ),
    "CPUWNA16LinearKernel cannot implement due to: Quant type (uint8b128)": (
        "weight-only int8 (pack-quantized, as compressed-tensors writes it) is vLLM's CompressedTensorsWNA16"
        " with uint8b128 weights; its CPU kernels take 4-bit weights only (its CUDA ones, Exllama and Conch, list"
        " uint8b128); the W8A8 export (`omnilm quantize --activations int8`) is the int8 vLLM's CPU build serves"
    ),
    "Failed to find a kernel that can implement the ScaledMM": (
        "weight-only fp8 (naive-quantized) is vLLM's CompressedTensorsW8A16Fp8, whose kernel list for CPU is"
        " empty in 0.32.0"
        " (_POSSIBLE_WFP8A16_KERNELS); its CPU fp8 kernels are W8A8 with fp8 activations, which OmniLM does"
        " not write"
    ),
    "NotImplementedError: \"cpu_gemm_wna16\" not implemented for 'Float'": (
        "vLLM's CPU int4 kernel (CPUWNA16LinearKernel) runs in bf16/fp16 only: the bf16 row serves the export"
    ),
}


# ---- the table -----------------------------------------------------------------------------------------

COLUMNS = (
    "family",
    "dtype",
    "loads",
    "greedy identical",
    "tokenizer / chat template",
    "transformers",
    "reason for any no",
)


def table_rows(rows: list[Row]) -> list[tuple]:
    out = []
    for r in rows:
        res = r.result
        if "loads" not in res:
            no = "no" if "reason" not in res or "transformers" in res else "-"
            out.append(
                (
                    r.family,
                    r.dtype,
                    no,
                    no,
                    no,
                    res.get("transformers", "-"),
                    "; ".join([res.get("reason", "")] + res.get("notes", [])).strip("; "),
                )
            )
            continue
        tok = f"{res['tokenizer']} / {res['chat']}"
        out.append(
            (
                r.family,
                r.dtype,
                res["loads"],
                res["greedy"],
                tok,
                res.get("transformers", "-"),
                "; ".join(res["notes"]),
            )
        )
    return out


def markdown(rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the venv with vllm-cpu")
    ap.add_argument("--only", default=None, help="comma-separated families (default: all rows)")
    ap.add_argument("--keep", default=None, help="write exports and logs here and keep them")
    ap.add_argument("--markdown", default=None, help="also write the table as Markdown to this file")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve)

    torch.set_num_threads(1)
    rows = [r for r in FAMILIES if not args.only or r.family in args.only.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="omnilm-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    have_vllm = Path(args.vllm_python).is_file()
    for r in rows:
        print(f"== {r.family} {r.dtype}", flush=True)
        try:
            case = prepare(r, work)
        except Exception:
            r.result = {"reason": "export failed: " + traceback.format_exc().strip().splitlines()[-1][:200]}
            continue
        if case is None:
            continue
        if not all(p["omnilm_varied"] for p in case["prompts"]):
            r.result.setdefault("notes", []).append("OmniLM's greedy output repeats (weights not hot enough)")
        if not have_vllm:
            r.result.setdefault("notes", []).append(f"no vLLM at {args.vllm_python}")
            continue
        r.result.update(run_vllm(args.vllm_python, work / f"{r.name}.case.json", work / f"{r.name}.vllm.log"))
    table = table_rows(rows)
    widths = [max(len(str(x)) for x in col) for col in zip(COLUMNS, *table)]
    for row in [COLUMNS, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    if args.markdown:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        where = f"{platform.machine()}, {os.cpu_count()} CPUs, vLLM from {args.vllm_python}"
        Path(args.markdown).write_text(f"Run {when} on {where}.\n\n{markdown(table)}\n")
    # the Done-when rows; LLaVA stopped by the missing torchvision is `make test-vllm-vision`'s (own venv)
    required = [r for r in rows if r.family in ("llama", "qwen2", "llava") and r.dtype == "float32"]
    deferred = [
        r for r in required if any("No module named 'torchvision'" in n for n in r.result.get("notes", []))
    ]
    for r in deferred:
        print(f"{r.family}: needs torchvision, checked by `make test-vllm-vision`")
    ok = all(r.result.get("greedy") == "yes" for r in required if r not in deferred)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
