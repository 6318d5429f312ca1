"""omnilm.Pipeline: the bundled demo answers through it as through `omnilm generate`; text streams,
stop strings end a request and free its pages; concurrent text requests equal each alone."""

import numpy as np
import pytest
import torch

import omnilm
from omnilm.cli import main
from omnilm.demo.data import dtmf_clip, load_digits, render_digit
from omnilm.generation import GenerationConfig
from omnilm.tokenizers.text import TextTokenizer


@pytest.fixture(scope="module")
def pipe():
    p = omnilm.Pipeline.from_pretrained("demo")
    yield p
    p.close()


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory):
    _, _, test_x, test_y = load_digits(seed=0)
    path = tmp_path_factory.mktemp("media") / "digit.png"
    render_digit(test_x[0], 16).save(path)
    return path, int(test_y[0])


def test_demo_answers_equal_the_cli(pipe, digit_png, tmp_path, capsys):
    path, label = digit_png
    out = pipe("which digit is this?", images=[str(path)], max_new_tokens=3)
    assert out.text.strip() == str(label) and out.finish_reason == "stop"
    assert main(["generate", "--model", "demo", "--image", str(path), "--prompt", "which digit is this?",
                 "--max-new-tokens", "3"]) in (0, None)  # fmt: skip
    assert capsys.readouterr().out.strip() == out.text.strip()
    import soundfile

    wav = tmp_path / "dial.wav"
    soundfile.write(wav, dtmf_clip("4821", np.random.default_rng(5)), 16000)
    assert pipe("which number was dialled?", audio=[str(wav)], max_new_tokens=7).text.strip() == "4821"


def test_stream_pieces_join_to_the_whole_answer(pipe):
    whole = pipe("draw a 7", max_new_tokens=12, eos_token_id=[]).text
    assert "".join(pipe.stream("draw a 7", max_new_tokens=12, eos_token_id=[])) == whole


def test_demo_draws_an_image(pipe):
    out = pipe("draw a 7", max_new_tokens=40)
    assert len(out.images) == 1 and out.images[0].size == (16, 16)


def test_stop_string_ends_the_request_and_frees_its_pages(pipe):
    whole = pipe(
        "which number was dialled?", max_new_tokens=20, eos_token_id=[], temperature=1.0, seed=3
    ).text
    assert len(whole) > 4
    stop = whole[2:4]
    out = pipe("which number was dialled?", max_new_tokens=20, eos_token_id=[], temperature=1.0, seed=3,
               stop_strings=(stop,))  # fmt: skip
    assert out.text == whole[: whole.index(stop)] and out.finish_reason == "stop"
    assert pipe.engine.pool.used == 0


def test_concurrent_requests_equal_each_alone(pipe):
    prompts = [("which digit is this?", dict(temperature=0.8, seed=s, max_new_tokens=8, eos_token_id=[]))
               for s in range(4)]  # fmt: skip
    prompts += [("draw a 3", dict(max_new_tokens=10, stop_strings=("x",))), ("hello", dict(max_new_tokens=6))]
    alone = [pipe(p, **s).text for p, s in prompts]
    reqs = [pipe.submit(p, **s) for p, s in prompts]
    assert [r.result().text for r in reqs] == alone


def test_bad_settings_and_inputs_fail_before_the_engine(pipe, tmp_path):
    with pytest.raises(omnilm.errors.OmniLMError):
        pipe("hi", temperature=-1)
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    with pytest.raises(omnilm.errors.MediaError):
        pipe.encode("which digit is this?", images=[str(bad)])


def test_generation_config_from_the_checkpoint(tmp_path):
    model = omnilm.build("tiny")
    model.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(
        '{"eos_token_id": [2, 5], "do_sample": true, "top_p": 0.8}'
    )
    # build() saves no tokenizer (yet): a directory without one needs it passed
    p = omnilm.Pipeline.from_pretrained(tmp_path, tokenizer=TextTokenizer.default())
    assert p.generation_config == GenerationConfig(eos_token_id=[2, 5], top_p=0.8)
    assert p._model is None  # weights load only when generation starts
    assert torch.is_tensor(p.model.language_model.lm_head.weight)
