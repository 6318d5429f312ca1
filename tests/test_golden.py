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
    try:
        assert getattr(cases, f"{name}_case")() == golden[name]
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
