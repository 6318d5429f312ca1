"""Outputs recorded before the engine refactor stay identical (tokens equal, losses bit-equal)."""

import json

import golden_cases as cases
import pytest


@pytest.fixture(scope="module")
def golden():
    return json.loads(cases.GOLDEN.read_text())


@pytest.mark.parametrize("name", ["text", "llava", "audio", "discrete"])
def test_generation_golden(golden, name):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    expected = dict(golden[name])
    if name == "text":
        # Recorded before the engine, a sampled batch drew every row from one shared generator. Each
        # request now has its own (issue 11: the same seed samples the same whatever the batch), and
        # row i of a batch samples with seed + i: row 0 gives its recorded alone-tokens (seed 3), row
        # 1 what it gives alone with seed 4; the left padding is kept.
        alone = expected["sampled_alone"]
        row1 = cases.text_row_alone(1, seed=4)
        expected["sampled"] = [[0] * (len(alone[1]) - len(alone[0])) + alone[0], row1]
    try:
        assert getattr(cases, f"{name}_case")() == expected
    finally:
        torch.set_num_threads(threads)


def test_training_losses_golden(golden, tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cases.training_case(tmp_path) == golden["training"]
    finally:
        torch.set_num_threads(threads)
