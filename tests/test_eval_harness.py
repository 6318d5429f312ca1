"""The lm-evaluation-harness adapter: its log-likelihoods equal transformers' on the same checkpoint, and
lm_eval.simple_evaluate runs it offline on small local JSON tasks."""

import json
import os

import pytest
import torch
from test_eval import text_model_dir

lm_eval = pytest.importorskip("lm_eval")


@pytest.mark.slow  # importing lm_eval and datasets takes ~20 s
def test_loglikelihood_equals_transformers_and_simple_evaluate_runs(tmp_path, monkeypatch):
    from lm_eval.api.instance import Instance
    from transformers import LlamaForCausalLM

    from omnilm.eval.harness import OmniLMHarness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, model_dir, _ = text_model_dir(tmp_path)
    lm = OmniLMHarness(str(model_dir))
    pairs = [("The json module", " encodes objects"), ("", "hello world")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    ours = lm.loglikelihood(reqs)

    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = lm.tok
    for (ctx, cont), (logprob, _) in zip(pairs, ours):
        whole, n_ctx = tok.encode(ctx + cont), len(tok.encode(ctx)) if ctx else 0
        ids = torch.tensor([[tok.bos_token_id] + whole])
        with torch.no_grad():
            lp = torch.log_softmax(hf(input_ids=ids).logits[0, :-1].float(), -1)
        target = ids[0, 1:]
        theirs = float(lp.gather(-1, target[:, None])[n_ctx:].sum())
        assert abs(logprob - theirs) < 1e-3 * max(1.0, abs(theirs))

    # two offline tasks from local JSON: multiple choice (loglikelihood) and exact match (generate_until)
    data = tmp_path / "qa.jsonl"
    rows = [
        {"q": f"{a} plus {b} is", "choices": [f" {a + b}", f" {a + b + 1}"], "label": 0}
        for a, b in [(1, 2), (3, 4)]
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    common = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (tasks / "mc.yaml").write_text(
        "task: omnilm_mc\n" + common + "output_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n"
    )
    (tasks / "gen.yaml").write_text(
        "task: omnilm_gen\n" + common + "output_type: generate_until\ndoc_to_text: '{{q}}'\n"
        "doc_to_target: '{{choices[0]}}'\ngeneration_kwargs:\n  until: ['\\n']\n  max_gen_toks: 4\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks))
    out = lm_eval.simple_evaluate(model=lm, tasks=["omnilm_mc", "omnilm_gen"], task_manager=manager)
    assert 0.0 <= out["results"]["omnilm_mc"]["acc,none"] <= 1.0
    assert out["results"]["omnilm_gen"]["exact_match,none"] == 0.0  # random weights do not add
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
