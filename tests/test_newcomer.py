"""A newcomer's path (issue 16): bad invocations refused before any model loads, hub ids through a local
cache, convert/compose writing whole directories that carry every file, strict tokenizer loading,
file modes, threads, help and start-up cost."""

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli_errors import assert_one_line_error, run_cli

import omnilm
from omnilm import cli
from omnilm.cli import build_parser
from omnilm.convert import audio as audio_mod
from omnilm.convert import codec as codec_mod
from omnilm.convert import compose as compose_mod
from omnilm.convert import files as files_mod
from omnilm.convert import formats, hf
from omnilm.convert import vision as vision_mod
from omnilm.convert.convert import convert_checkpoint
from omnilm.errors import CheckpointError
from omnilm.models.omni import OmniModel
from omnilm.tokenizers.text import TextTokenizer

DEMO = omnilm.BUNDLED_MODELS["demo"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def digest(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def strip_tokenizer(path):
    """A directory as `build(...).save_pretrained` wrote it before saving tokenizers, and as a bare
    weights download looks."""
    for name in TOKENIZER_FILES:
        (path / name).unlink(missing_ok=True)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama-format model with its tokenizer (the bundled default, which fits its 2048 rows)."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    omnilm.build("tiny", seed=3).save_pretrained(path)
    TextTokenizer.default().save(path)
    return path


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory, tiny_dir):
    path = tmp_path_factory.mktemp("bare") / "llama"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        (path / name).write_bytes((tiny_dir / name).read_bytes())
    return strip_tokenizer(path)


@pytest.fixture
def hub_cache(tmp_path, tiny_dir, monkeypatch):
    """A Hugging Face cache layout (refs/ -> snapshots/<commit>/) holding org/tiny at main and at tag v1
    (another snapshot: the same weights perturbed), and a pickle-only repo; HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    commits = {"main": "a" * 40, "v1": "b" * 40}
    for ref, commit in commits.items():
        snap = cache / "models--org--tiny" / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in tiny_dir.iterdir():
            (snap / f.name).write_bytes(f.read_bytes())
        (cache / "models--org--tiny" / "refs").mkdir(exist_ok=True)
        (cache / "models--org--tiny" / "refs" / ref).write_text(commit)
    v1 = cache / "models--org--tiny" / "snapshots" / commits["v1"]
    model = omnilm.load(v1)
    with torch.no_grad():
        model.language_model.model.norm.weight.mul_(1.5)
    model.save_pretrained(v1)
    pick = cache / "models--org--pickled" / "snapshots" / ("c" * 40)
    pick.mkdir(parents=True)
    (pick / "config.json").write_text((tiny_dir / "config.json").read_text())
    (pick / "pytorch_model.bin").write_bytes(b"not opened")
    (cache / "models--org--pickled" / "refs").mkdir()
    (cache / "models--org--pickled" / "refs" / "main").write_text("c" * 40)
    codec = cache / "models--org--codec" / "snapshots" / ("d" * 40)  # load_codec takes hub ids too
    codec.mkdir(parents=True)
    for f in (DEMO / "image_tokenizer").iterdir():
        (codec / f.name).write_bytes(f.read_bytes())
    (cache / "models--org--codec" / "refs").mkdir()
    (cache / "models--org--codec" / "refs" / "main").write_text("d" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, commits


# ---- the table of bad invocations ------------------------------------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Every refusal in the table must come before weights are read."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the invocation was refused")

    monkeypatch.setattr(omnilm, "load", refuse)
    monkeypatch.setattr(omnilm.api, "load", refuse)
    monkeypatch.setattr(formats, "load", refuse)
    for module in (hf, compose_mod, audio_mod, codec_mod, vision_mod):  # each imported it by name
        monkeypatch.setattr(module, "read_state_dict", refuse)


def bad_invocations(m, bare, tmp, cuda):
    """(argv, words the error must contain). `m` is a good model directory, `bare` one without tokenizer."""
    full = tmp / "full"  # an existing, non-empty output directory
    a_file = tmp / "a_file"
    gen = ["generate", "--model", m, "--prompt", "hi"]
    rows = [
        ([], None),  # placeholder for the bare command, which is not an error (tested below)
        (["frobnicate"], ["invalid choice", "frobnicate"]),
        (["--nope"], ["--nope"]),
        (["plan"], ["--preset"]),
        (["plan", "--preset", "llama-9b"], ["llama-9b", "design-88b"]),
        (["plan", "--preset", "tiny", "--mfu", "0"], ["--mfu"]),
        (["plan", "--preset", "tiny", "--mfu", "1.5"], ["--mfu", "1.5"]),
        (["plan", "--preset", "tiny", "--gpus", "0"], ["--gpus"]),
        (["plan", "--preset", "tiny", "--gpus", "two"], ["--gpus", "two"]),
        (["plan", "--preset", "tiny", "--seq-len", "-5"], ["--seq-len"]),
        (["plan", "--preset", "tiny", "--tokens", "-1"], ["--tokens"]),
        (["plan", "--preset", "tiny", "--tokens", "nan"], ["--tokens", "nan"]),
        (["generate", "--prompt", "hi"], ["--model"]),
        (gen + ["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (gen + ["--max-new-tokens", "1.5"], ["--max-new-tokens", "1.5"]),
        (gen + ["--temperature", "-0.1"], ["--temperature"]),
        (gen + ["--temperature", "inf"], ["--temperature", "inf"]),
        (gen + ["--top-k", "0"], ["--top-k"]),
        (gen + ["--top-p", "0"], ["--top-p"]),
        (gen + ["--top-p", "1.5"], ["--top-p"]),
        (gen + ["--seed", "-1"], ["--seed"]),
        (gen + ["--seed", "abc"], ["--seed", "abc"]),
        (gen + ["--guidance-scale", "-1"], ["--guidance-scale"]),
        (gen + ["--dtype", "float8"], ["--dtype", "float8"]),
        (gen + ["--device", "mps"], ["--device mps", "not available"]),
        (gen + ["--device", "tpu"], ["--device", "tpu", "cuda:N"]),
        (gen + ["--device", "cuda:x"], ["--device", "cuda:x"]),
        (gen + ["--output-image", tmp / "out.jpgg"], ["--output-image", ".jpgg", ".png"]),
        (gen + ["--output-image", tmp], ["--output-image", "directory"]),
        (gen + ["--output-image", tmp / "no" / "such" / "x.png"], ["--output-image", "does not exist"]),
        (gen + ["--output-image", tmp / "noext"], ["--output-image", "extension"]),
        (gen + ["--output-audio", tmp / "out.mp5"], ["--output-audio", ".mp5", ".wav"]),
        (gen + ["--output-audio", str(tmp) + "/"], ["--output-audio", "directory"]),
        (["generate", "--model", "demo", "--image", tmp / "missing.png"], ["missing.png"]),
        (["generate", "--model", "demo", "--audio", tmp / "missing.wav"], ["missing.wav"]),
        (["generate", "--model", "demo", "--file", tmp / "missing.pdf"], ["missing.pdf"]),
        (gen + ["--image", tmp / "missing.png"], ["no image processor"]),
        (["generate", "--model", tmp / "nowhere", "--prompt", "hi"], ["nowhere"]),
        (["generate", "--model", bare, "--prompt", "hi"], ["tokenizer.json", "--tokenizer"]),
        (gen + ["--tokenizer", tmp / "no-tokenizer"], ["no-tokenizer"]),
        (gen + ["--system", "be brief"], ["--system", "--chat"]),
        (["serve", "--model", m, "--threads", "0"], ["--threads"]),
        (["serve", "--model", m, "--engine", "fiber"], ["--engine", "fiber"]),
        (["generate", "--model", "org/absent", "--prompt", "hi"], ["org/absent", "not in the cache"]),
        (["convert", "--model", m, "--out", full], ["--out", "not empty", "--overwrite"]),
        (["convert", "--model", m, "--out", a_file], ["--out", "is a file"]),
        (["convert", "--model", m, "--out", a_file / "sub"], ["a_file", "not a directory"]),
        (["convert", "--model", m, "--out", tmp / "x", "--dtype", "int8"], ["--dtype", "int8"]),
        (["convert", "--model", m], ["--out"]),
        (["convert", "--model", tmp / "nowhere", "--out", tmp / "x"], ["nowhere"]),
        (["compose", "--text", m, "--out", full], ["--out", "not empty"]),
        (["compose", "--text", bare, "--out", tmp / "c1"], ["tokenizer.json", "--text"]),
        (["compose", "--text", m, "--vision", tmp / "no-vision", "--out", tmp / "c2"], ["no-vision"]),
        (["compose", "--text", m, "--tokenizer", bare, "--out", tmp / "c3"], ["tokenizer.json"]),
        (["train", "--config", tmp / "missing.yaml"], ["missing.yaml"]),
        (["train", "--config", tmp / "c.yaml", "--max-steps", "0"], ["--max-steps"]),
        (["train", "--config", tmp / "c.yaml", "--threads", "0"], ["--threads"]),
        (["tokenizer"], ["required"]),
        (["tokenizer", "train", "--input", tmp / "t.txt", "--vocab-size", "10", "--out", tmp / "t"], ["--vocab-size"]),
        (["tokenizer", "train", "--input", tmp / "none.txt", "--vocab-size", "300", "--out", tmp / "t"], ["none.txt"]),
        (["tokenizer", "train-image", "--out", tmp / "t"], ["--images", "--demo"]),
        (["tokenizer", "train-image", "--demo", "--out", tmp / "t", "--device", "mps"], ["mps"]),
        (["tokenizer", "train-audio", "--demo", "--audio", tmp, "--out", tmp / "t"], ["not allowed"]),
        (["tokenizer", "train-audio", "--demo", "--out", tmp / "t", "--steps", "-3"], ["--steps"]),
    ]  # fmt: skip
    if not cuda:
        rows.append((gen + ["--device", "cuda:0"], ["--device cuda:0", "CUDA is not available"]))
    return rows[1:]


def test_bad_invocations_are_one_line_errors_before_any_model_loads(
    tiny_dir, bare_dir, tmp_path, hub_cache, no_model_load, capsys
):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("keep me too")
    (tmp_path / "t.txt").write_text("some text\n")
    before = digest(tmp_path)
    rows = bad_invocations(tiny_dir, bare_dir, tmp_path, torch.cuda.is_available())
    assert len(rows) >= 40
    threads = torch.get_num_threads()  # `train` sets them before it reads its config
    try:
        for argv, needles in rows:
            rc, out, err = run_cli(capsys, *argv)
            assert_one_line_error(rc, err, *needles)
            assert out == "" or out.startswith("threads: "), (argv, out)
    finally:
        torch.set_num_threads(threads)
    after = digest(tmp_path)
    assert {k: v for k, v in after.items() if k.parts[0] != "hub"} == {
        k: v for k, v in before.items() if k.parts[0] != "hub"
    }  # nothing written, nothing changed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_bad_invocation_in_a_real_process(tiny_dir, tmp_path):
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "hi", "--device", "mps"]
    r = subprocess.run([sys.executable, "-m", "omnilm", *argv], capture_output=True, text=True, timeout=120)
    assert_one_line_error(r.returncode, r.stderr, "mps")
    assert "Traceback" not in r.stdout


# ---- help, --version, bare command ----------------------------------------------------------------------


def _parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_and_every_command_a_description(capsys):
    parsers = list(_parsers(build_parser()))
    assert len(parsers) >= 10
    for p in parsers:
        assert p.description, p.prog
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (p.prog, action.option_strings)
    text = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "(default: 64)" in text and "float32" in text and "PDF" in text
    plan_help = build_parser()._subparsers._group_actions[0].choices["plan"].format_help()
    assert "design-88b" in plan_help


def test_version_and_bare_command(capsys):
    rc, out, err = run_cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"omnilm {omnilm.__version__}"
    rc, out, err = run_cli(capsys)
    assert rc == 0 and out.startswith("usage: omnilm") and "generate" in out and err == ""


# ---- hub ids -------------------------------------------------------------------------------------------


def test_hub_ids_resolve_through_the_local_cache(hub_cache, tiny_dir, tmp_path, capsys):
    cache, commits = hub_cache
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]])
    local = omnilm.load(tiny_dir)(input_ids=ids).logits
    assert torch.equal(omnilm.load("org/tiny")(input_ids=ids).logits, local)
    tagged = omnilm.load("org/tiny@v1")(input_ids=ids).logits
    assert not torch.allclose(tagged, local)  # another snapshot
    assert torch.equal(omnilm.load(f"org/tiny@{commits['v1']}")(input_ids=ids).logits, tagged)
    proc = omnilm.load_processor("org/tiny")
    assert (
        proc(text="hello")["input_ids"].tolist()
        == omnilm.load_processor(tiny_dir)(text="hello")["input_ids"].tolist()
    )
    with pytest.raises(CheckpointError, match="pickle"):
        omnilm.load("org/pickled")
    codes = torch.randint(0, 8, (1, 4, 4))
    assert torch.equal(
        omnilm.load_codec("org/codec").decode(codes),
        omnilm.load_codec(DEMO / "image_tokenizer").decode(codes),
    )
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1"):
        omnilm.load("org/tiny@v9")
    # the CLI and compose take hub ids too
    rc, out, err = run_cli(capsys, "generate", "--model", "org/tiny", "--prompt", "hi", "--max-new-tokens", 2)
    assert rc == 0 and err == "", err
    composed = compose_mod.compose("org/tiny", out=tmp_path / "composed")
    assert torch.equal(
        composed.language_model.lm_head.weight, omnilm.load(tiny_dir).language_model.lm_head.weight
    )


def test_an_existing_local_path_wins_over_a_hub_id(hub_cache, tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny").symlink_to(tiny_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert omnilm.api.resolve("org/tiny") == Path("org/tiny")


# ---- strict tokenizer loading --------------------------------------------------------------------------


def test_a_directory_without_tokenizer_is_refused_unless_one_is_given(bare_dir, tiny_dir):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is missing") as e:
        omnilm.load_processor(bare_dir)
    assert str(bare_dir) in str(e.value) and "tokenizer=" in str(e.value)
    want = omnilm.load_processor(tiny_dir)(text="hello world")["input_ids"].tolist()
    assert (
        omnilm.load_processor(bare_dir, tokenizer=tiny_dir)(text="hello world")["input_ids"].tolist() == want
    )
    given = omnilm.load_processor(bare_dir, tokenizer=TextTokenizer.from_dir(tiny_dir))
    assert given(text="hello world")["input_ids"].tolist() == want


def test_cli_tokenizer_option(bare_dir, tiny_dir, capsys):
    rc, out, err = run_cli(
        capsys,
        "generate",
        "--model",
        bare_dir,
        "--tokenizer",
        tiny_dir,
        "--prompt",
        "hi",
        "--max-new-tokens",
        2,
    )
    assert rc == 0 and err == "", err


# ---- convert and compose -------------------------------------------------------------------------------


def test_convert_carries_every_file_and_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "demo-copy"
    rc, stdout, err = run_cli(capsys, "convert", "--model", "demo", "--out", out)
    assert rc == 0 and err == "", err
    for name in files_mod.CARRY_FILES:
        if (DEMO / name).is_file():
            assert (out / name).read_bytes() == (DEMO / name).read_bytes(), name
    for name in ("tokenizer.json", "preprocessor_config.json", "processor_config.json"):
        assert (out / name).is_file(), name
    for f in (DEMO / "image_tokenizer").iterdir():
        assert (out / "image_tokenizer" / f.name).read_bytes() == f.read_bytes()
    # the converted directory loads with the demo's own processor and tokenizer
    a, b = omnilm.load_processor(out), omnilm.load_processor("demo")
    assert a(text="draw a 7")["input_ids"].tolist() == b(text="draw a 7")["input_ids"].tolist()
    assert omnilm.load_codec(out / "image_tokenizer") is not None

    before = digest(out)
    rc, _, err = run_cli(capsys, "convert", "--model", "demo", "--out", out)
    assert_one_line_error(rc, err, "not empty", "--overwrite")
    assert digest(out) == before
    (out / "omnilm_config.json.stale").write_text("{}")  # a stale file from an earlier run
    rc, _, err = run_cli(capsys, "convert", "--model", "demo", "--out", out, "--overwrite")
    assert rc == 0, err
    assert not (out / "omnilm_config.json.stale").exists() and digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-copy"]  # no temporary directories left


def test_an_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    def fail(model, path):
        (path / "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(OmniModel, "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(DEMO, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_compose_carries_the_text_models_files(tiny_dir, tmp_path):
    text = tmp_path / "llama"
    text.mkdir()
    for f in tiny_dir.iterdir():
        (text / f.name).write_bytes(f.read_bytes())
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = json.loads((text / "tokenizer_config.json").read_text())
    (text / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    (text / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    (text / "chat_template.jinja").write_text(template)
    out = tmp_path / "omni"
    compose_mod.compose(text, out=out)
    assert json.loads((out / "generation_config.json").read_text())["top_p"] == 0.9
    assert (out / "chat_template.jinja").read_text() == template
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert (out / "tokenizer.json").is_file() and (out / "processor_config.json").is_file()
    before = digest(out)
    with pytest.raises(CheckpointError, match="not empty"):
        compose_mod.compose(text, out=out)
    assert digest(out) == before
    compose_mod.compose(text, out=out, overwrite=True)
    assert digest(out) == before


# ---- file modes ----------------------------------------------------------------------------------------


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p):
    return stat.S_IMODE(p.stat().st_mode)


def test_written_files_honour_the_umask(tmp_path, umask022, capsys):
    model = omnilm.build("tiny")
    model.save_pretrained(tmp_path / "m")
    assert {p.name: _mode(p) for p in (tmp_path / "m").iterdir()} == {
        p.name: 0o644 for p in (tmp_path / "m").iterdir()
    }
    hf.write_state_dict(dict(model.state_dict()), tmp_path / "sharded", max_shard_bytes=200_000)
    shards = list((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and {_mode(p) for p in shards} == {0o644}
    rc, _, err = run_cli(capsys, "convert", "--model", "demo", "--out", tmp_path / "c")
    assert rc == 0, err
    assert _mode(tmp_path / "c") == 0o755 and _mode(tmp_path / "c" / "image_tokenizer") == 0o755
    assert {_mode(p) for p in (tmp_path / "c").rglob("*") if p.is_file()} == {0o644}
    os.umask(0o077)
    model.save_pretrained(tmp_path / "private")
    assert {_mode(p) for p in (tmp_path / "private").iterdir()} == {0o600}


# ---- threads, plan start-up ----------------------------------------------------------------------------


def test_default_threads_are_the_physical_cores_available(monkeypatch):
    from omnilm import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n, why = threads.default_threads()
    assert 1 <= n <= len(os.sched_getaffinity(0)) and "physical cores" in why
    assert threads.physical_cores({0}) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == (3, "OMP_NUM_THREADS")
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0 * cpus, 0.0, 0.0))
    assert "--threads 1 may be much faster" in threads.busy_note(2)
    assert threads.busy_note(1) == ""  # one thread is already the advice
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert threads.busy_note(2) == ""


def test_a_server_leaves_one_core_to_its_front_end(monkeypatch):
    from omnilm import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "physical_cores", lambda cpus=None: 4)
    assert threads.serving_threads()[0] == 3
    monkeypatch.setattr(threads, "physical_cores", lambda cpus=None: 1)
    assert threads.serving_threads()[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert threads.serving_threads() == (2, "OMP_NUM_THREADS")


def test_train_log_says_how_many_threads(tmp_path, monkeypatch, capsys):
    import omnilm.training.config as config
    import omnilm.training.loop as loop

    monkeypatch.setattr(config, "load_train_config", lambda path: type("Cfg", (), {"out": tmp_path})())
    monkeypatch.setattr(loop, "train", lambda *a, **k: [])
    before = torch.get_num_threads()
    try:
        rc, out, err = run_cli(capsys, "train", "--config", tmp_path / "c.yaml", "--threads", 1)
        assert rc == 0 and out.startswith("threads: 1 (--threads") and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        rc, out, err = run_cli(capsys, "train", "--config", tmp_path / "c.yaml")
        assert out.startswith(f"threads: {torch.get_num_threads()} (physical cores")
    finally:
        torch.set_num_threads(before)


def test_plan_does_not_import_dynamo():
    """Building on the meta device through torch's reference kernels imports torch._dynamo: seconds of
    start-up for `omnilm plan` (timing belongs in benchmarks; the import is what regresses)."""
    code = (
        "import sys; from omnilm.plan import plan_preset; plan_preset('design-88b'); plan_preset('unified-8b');"
        "print('torch._dynamo' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_cli_module_imports_nothing_heavy():
    r = subprocess.run(
        [sys.executable, "-c", "import sys, omnilm.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == "False", r.stderr
    assert cli.DTYPES  # the names --dtype accepts are the ones omnilm.api._dtype knows
    assert all(omnilm.api._dtype(d) is not None for d in cli.DTYPES)
