"""omnilm eval: strided perplexity equals transformers' on the same checkpoint and ids; exact-match task
accuracy of the bundled demo on digits it was not trained on; refusals."""

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_quant import tiny_llama

import omnilm
from omnilm.cli import main
from omnilm.eval import strided_perplexity

TOKENIZER = Path(omnilm.__file__).parent / "assets" / "tokenizer"


def text_model_dir(tmp_path):
    model = tiny_llama(vocab=2048)  # the bundled tokenizer's vocabulary
    out = tmp_path / "llama"
    model.save_pretrained(out)
    for f in TOKENIZER.iterdir():
        shutil.copy(f, out / f.name)
    text = tmp_path / "doc.txt"
    text.write_text(inspect.getdoc(json)[:1200])  # real prose available offline
    return model, out, text


def hf_strided_perplexity(hf, ids, context, stride):
    """The Hugging Face recipe with transformers' own loss, scored tokens counted exactly."""
    ids = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + context, ids.shape[1])
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        n = int((labels[:, 1:] != -100).sum())
        nll += float(hf(input_ids=window, labels=labels).loss) * n
        count += n
        prev_end = end
        if end == ids.shape[1]:
            break
    return float(torch.exp(torch.tensor(nll / count, dtype=torch.float64)))


def test_text_perplexity_equals_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    _, out, text = text_model_dir(tmp_path)
    assert (
        main(
            ["eval", "--model", str(out), "--text", str(text), "--context", "64", "--stride", "24", "--json"]
        )
        == 0
    )
    ours = json.loads(capsys.readouterr().out)
    assert ours["windows"] > 3
    ids = omnilm.load_processor(out).tokenizer.encode(text.read_text(), add_bos=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf_strided_perplexity(hf, ids, 64, 24)
    assert abs(ours["perplexity"] - theirs) / theirs < 1e-4
    assert ours["tokens"] == len(ids) - 1  # every token but the first scored exactly once


def test_stride_equal_to_context_scores_disjoint_windows():
    model = tiny_llama()
    ids = torch.randint(0, 256, (40,))
    one = strided_perplexity(model, ids, context=40)
    assert one["windows"] == 1 and one["tokens"] == 39
    disjoint = strided_perplexity(model, ids, context=10, stride=10)
    # a disjoint window's first token has no context and is not scored
    assert disjoint["windows"] == 4 and disjoint["tokens"] == 36


def test_demo_task_accuracy(tmp_path, capsys):
    from omnilm.demo.data import load_digits, render_digit

    _, _, test_x, test_y = load_digits(seed=0)
    lines = []
    for i in range(8):
        render_digit(test_x[i]).save(tmp_path / f"{i}.png")
        lines.append(
            json.dumps({"prompt": "which digit is this?", "image": f"{i}.png", "answer": str(test_y[i])})
        )
    tasks = tmp_path / "digits.jsonl"
    tasks.write_text("\n".join(lines) + "\n")
    for extra in ([], ["--quantize", "int8"]):
        assert (
            main(
                ["eval", "--model", "demo", "--tasks", str(tasks), "--max-new-tokens", "3", "--json", *extra]
            )
            == 0
        )
        result = json.loads(capsys.readouterr().out)
        assert result["total"] == 8 and result["accuracy"] >= 0.75, result


def test_bad_task_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "answer": "x"}\n{"prompt": 3}\n')
    assert main(["eval", "--model", "demo", "--tasks", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2: expected an object with 'prompt'" in err
