"""Hostile inputs, seeded: pickle payloads through every loader, malformed checkpoints, malformed media.

Every case must end in a typed OmniLMError or a valid result, within a time and a peak-memory bound
checked per case (a sampler thread reads the process's resident memory while the case runs). The fast
part runs in `make test`; the full corpora (>= 50 malformed files per media kind) and the CLI
subprocess cases are @pytest.mark.slow. Set FUZZ_REPORT=path to get the per-category counts as JSON.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import pickle
import random
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

import omnilm
from omnilm.config import DecoderConfig, ModelConfig
from omnilm.errors import OmniLMError

ROOT = Path(__file__).resolve().parent.parent
CASE_SECONDS = 10.0  # the goal on the 2-core machine
CASE_RSS_BYTES = int(1.5 * 1024**3)
REPORT: dict[str, dict] = {}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- running one case under bounds ---------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakRSS:
    """Samples resident memory every few ms while a case runs (ru_maxrss only ever grows)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def run_case(category: str, name: str, fn, ok=None):
    """Run fn(); a typed OmniLMError or a return that `ok` accepts passes. Records the outcome."""
    stats = REPORT.setdefault(
        category, {"cases": 0, "typed": 0, "ok": 0, "failures": [], "slowest": (0.0, ""), "peak_rss": (0, "")}
    )
    stats["cases"] += 1
    outcome = None
    t0 = time.perf_counter()
    with _PeakRSS() as mem:
        try:
            result = fn()
            outcome = "ok" if ok is None or ok(result) else f"unacceptable result {result!r:.200}"
        except OmniLMError:
            outcome = "typed"
        except Exception as e:  # noqa: BLE001 - the point: anything untyped is a failure
            outcome = f"untyped {type(e).__name__}: {str(e)[:200]}"
    seconds = time.perf_counter() - t0
    if seconds > stats["slowest"][0]:
        stats["slowest"] = (round(seconds, 3), name)
    stats.setdefault("outcomes", []).append((name, outcome[:120], round(seconds, 3), mem.peak // 2**20))
    if mem.peak > stats["peak_rss"][0]:
        stats["peak_rss"] = (mem.peak, name)
    if outcome in ("ok", "typed"):
        stats[outcome] += 1
    if seconds > CASE_SECONDS:
        outcome = f"took {seconds:.1f} s"
    if mem.peak > CASE_RSS_BYTES:
        outcome = f"peak RSS {mem.peak / 2**30:.2f} GiB"
    if outcome not in ("ok", "typed"):
        stats["failures"].append(f"{name}: {outcome}")
    return outcome


def assert_category(category: str):
    stats = REPORT[category]
    _write_report()
    assert not stats["failures"], "\n".join(stats["failures"])


def _write_report():
    path = os.environ.get("FUZZ_REPORT")
    if path:
        Path(path).write_text(json.dumps(REPORT, indent=1))


# ---- tiny checkpoints ---------------------------------------------------------------------------------------

DECODER = dict(vocab_size=2048, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64,
               rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_embeddings=False)  # fmt: skip


def llama_dir(path: Path) -> Path:
    omnilm.build(ModelConfig(decoder=DecoderConfig(**DECODER)), seed=0).save_pretrained(
        path
    )  # a plain decoder: llama
    assert (path / "config.json").is_file()
    return path


def omni_dir(path: Path) -> Path:
    from omnilm.convert.hf import save_omnilm

    save_omnilm(omnilm.build(ModelConfig(decoder=DecoderConfig(**DECODER)), seed=0), path)
    assert (path / "omnilm_config.json").is_file()
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """One of each directory kind, copied per case."""
    root = tmp_path_factory.mktemp("fuzz-base")
    from omnilm.config import ImageVQConfig
    from omnilm.convert.codec import save_codec
    from omnilm.models.vq.image_vqvae import ImageVQVAE
    from omnilm.training.lora import apply_lora, save_adapter

    dirs = {"llama": llama_dir(root / "llama"), "omni": omni_dir(root / "omni")}
    torch.manual_seed(0)
    dirs["codec"] = save_codec(
        ImageVQVAE(ImageVQConfig(image_size=16, downsample=4, codebook_size=16, code_dim=8, channels=8)),
        root / "codec",
    )
    lora_model = omnilm.load(dirs["llama"])
    apply_lora(lora_model, 4, 8, 0.0)
    save_adapter(lora_model, root / "adapter")
    dirs["adapter"] = root / "adapter"
    dirs["train"] = _trained_run(root / "train", dirs["llama"])
    return dirs


def _train_cfg(model_dir, steps=4, save_every=2):
    from omnilm.training.config import train_config_from_dict

    return train_config_from_dict({
        "model": str(model_dir), "data": {"path": str(ROOT / "examples" / "data" / "tiny.jsonl"), "seq_len": 32},
        "steps": steps, "batch_size": 2, "optim": {"lr": 1e-2, "warmup_steps": 1}, "keep_last": 2,
        "save_every": save_every,
    })  # fmt: skip


def _trained_run(out: Path, model_dir: Path) -> Path:
    from omnilm.training.loop import train

    train(_train_cfg(model_dir), out, progress=False)
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- pickle payloads ---------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs code that creates `marker`; four different ways to be called."""

    def __init__(self, marker: Path, how: str):
        self.marker, self.how = str(marker), how

    def __reduce__(self):
        touch = f"open({self.marker!r}, 'w').close()"
        if self.how == "exec":
            return (exec, (touch,))
        if self.how == "eval":
            return (eval, (f"__import__('os').close(__import__('os').open({self.marker!r}, 65))",))
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        return (subprocess.call, (["touch", self.marker],))


HOWS = ("exec", "eval", "system", "call")


def pickle_bytes(marker: Path, i: int) -> bytes:
    return pickle.dumps(Payload(marker, HOWS[i % 4]), protocol=(0, 2, 4, 5)[i % 4])


def torch_zip(marker: Path, i: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"weight": Payload(marker, HOWS[i % 4])}, buf)
    return buf.getvalue()


def _rewrite_manifest(ckpt: Path):
    from omnilm.training.checkpoint import MANIFEST, _write_manifest

    (ckpt / MANIFEST).unlink(missing_ok=True)
    _write_manifest(ckpt)


def _distcp_with_bytes_payload(dcp_dir: Path, payload: bytes):
    """Replace one BYTE_IO item (an optimizer hyper-parameter) of the .distcp with `payload`, with
    metadata rewritten to match: what an attacker who edits a checkpoint would do."""
    meta_file = dcp_dir / ".metadata"
    md = pickle.loads(meta_file.read_bytes())  # our own trusted file, in the test
    target = next(k for k, v in md.storage_data.items() if k.fqn.endswith("param_groups.0.lr"))
    blobs = {}
    for key, info in md.storage_data.items():
        raw = (dcp_dir / info.relative_path).read_bytes()[info.offset : info.offset + info.length]
        blobs[key] = payload if key == target else raw
    out, offset = bytearray(), 0
    for key, info in md.storage_data.items():
        info.relative_path, info.offset, info.length = "__0_0.distcp", offset, len(blobs[key])
        out += blobs[key]
        offset += len(blobs[key])
    for f in dcp_dir.glob("*.distcp"):
        f.unlink()
    (dcp_dir / "__0_0.distcp").write_bytes(bytes(out))
    meta_file.write_bytes(pickle.dumps(md))


def _resume(run: Path, model_dir: Path):
    from omnilm.training.loop import Trainer

    trainer = Trainer(_train_cfg(model_dir, steps=6), run, resume=True, progress=False)
    return trainer.step


def pickle_cases(base, tmp: Path):
    """(name, setup(dir) -> callable) for every entry point that reads a file someone hands you."""
    from omnilm.convert.compose import compose
    from omnilm.training.checkpoint import latest_checkpoint
    from omnilm.training.lora import load_adapter

    def ckpt_of(run):
        return latest_checkpoint(run / "checkpoints")

    def load_case(kind, mutate):
        def setup(d, marker, i):
            m = copy(base[kind], d / "m")
            mutate(m, marker, i)
            return lambda: omnilm.load(m)

        return setup

    def put(name, data_fn):
        return lambda m, marker, i: (m / name).write_bytes(data_fn(marker, i))

    def index_to(shard, data_fn):
        def mutate(m, marker, i):
            (m / "model.safetensors").unlink()
            (m / shard).write_bytes(data_fn(marker, i))
            keys = ["model.embed_tokens.weight"]
            (m / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": dict.fromkeys(keys, shard)})
            )

        return mutate

    def bin_only(m, marker, i):
        (m / "model.safetensors").unlink()
        (m / "pytorch_model.bin").write_bytes(torch_zip(marker, i))

    def resume_case(mutate):
        def setup(d, marker, i):
            run = copy(base["train"], d / "run")
            ckpt = ckpt_of(run)
            mutate(ckpt, marker, i)
            _rewrite_manifest(ckpt)
            return lambda: _resume(run, base["llama"])

        return setup

    def nested_metadata(ckpt, marker, i):
        from torch.distributed.checkpoint.metadata import Metadata

        md = Metadata(state_dict_metadata={"x": Payload(marker, HOWS[i % 4])})
        (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(md))

    def codec_case(name, data_fn):
        def setup(d, marker, i):
            m = copy(base["codec"], d / "m")
            (m / name).write_bytes(data_fn(marker, i))
            return lambda: omnilm.load_codec(m)

        return setup

    def encoder_case(name, data_fn):
        def setup(d, marker, i):
            m = copy(base["llama"], d / "m")  # a SigLIP config over a pickle: the weights are never opened
            cfg = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                   "num_hidden_layers": 1, "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip
            (m / "config.json").write_text(json.dumps(cfg))
            (m / name).write_bytes(data_fn(marker, i))
            return lambda: omnilm.load_encoder(m)

        return setup

    def adapter_case(name, data_fn):
        def setup(d, marker, i):
            a = copy(base["adapter"], d / "a")
            (a / name).write_bytes(data_fn(marker, i))
            return lambda: load_adapter(omnilm.load(base["llama"]), a)

        return setup

    def compose_case(name, data_fn):
        def setup(d, marker, i):
            t = copy(base["llama"], d / "t")
            (t / name).write_bytes(data_fn(marker, i))
            return lambda: compose(t, out=d / "out")

        return setup

    def generate_after_load(d, marker, i):
        m = copy(base["omni"], d / "m")
        (m / "model.safetensors").write_bytes(pickle_bytes(marker, i))
        return lambda: omnilm.load(m).generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2)

    return [
        ("load: model.safetensors is a pickle", load_case("llama", put("model.safetensors", pickle_bytes))),
        ("load: model.safetensors is a torch zip", load_case("llama", put("model.safetensors", torch_zip))),
        ("load: only pytorch_model.bin", load_case("llama", bin_only)),
        ("load: config.json is a pickle", load_case("llama", put("config.json", pickle_bytes))),
        ("load: index is a pickle", load_case("llama", put("model.safetensors.index.json", pickle_bytes))),
        ("load: index names a pickle shard", load_case("llama", index_to("model-1.safetensors", pickle_bytes))),
        ("load: index names a .bin shard", load_case("llama", index_to("pytorch_model.bin", torch_zip))),
        ("load: omnilm_config.json is a pickle", load_case("omni", put("omnilm_config.json", pickle_bytes))),
        ("load: omnilm weights are a torch zip", load_case("omni", put("model.safetensors", torch_zip))),
        ("generate: weights are a pickle", generate_after_load),
        ("load_codec: omnilm_codec.json", codec_case("omnilm_codec.json", pickle_bytes)),
        ("load_codec: model.safetensors", codec_case("model.safetensors", pickle_bytes)),
        ("load_encoder: config.json", encoder_case("config.json", pickle_bytes)),
        ("load_encoder: model.safetensors", encoder_case("model.safetensors", torch_zip)),
        ("lora: adapter_config.json", adapter_case("adapter_config.json", pickle_bytes)),
        ("lora: adapter_model.safetensors", adapter_case("adapter_model.safetensors", torch_zip)),
        ("compose: text model.safetensors", compose_case("model.safetensors", pickle_bytes)),
        ("compose: text config.json", compose_case("config.json", pickle_bytes)),
        ("resume: dcp/.metadata", resume_case(lambda c, mk, i: (c / "dcp" / ".metadata").write_bytes(pickle_bytes(mk, i)))),
        ("resume: payload inside DCP metadata", resume_case(nested_metadata)),
        ("resume: .distcp bytes item", resume_case(lambda c, mk, i: _distcp_with_bytes_payload(c / "dcp", pickle_bytes(mk, i)))),
        ("resume: .distcp bytes item torch zip", resume_case(lambda c, mk, i: _distcp_with_bytes_payload(c / "dcp", torch_zip(mk, i)))),
        ("resume: whole .distcp is a torch zip", resume_case(lambda c, mk, i: (c / "dcp" / "__0_0.distcp").write_bytes(torch_zip(mk, i)))),
        ("resume: rng.safetensors", resume_case(lambda c, mk, i: (c / "rng.safetensors").write_bytes(pickle_bytes(mk, i)))),
        ("resume: trainer_state.json", resume_case(lambda c, mk, i: (c / "trainer_state.json").write_bytes(pickle_bytes(mk, i)))),
    ]  # fmt: skip


def test_no_pickle_payload_runs_through_any_loader(base, tmp_path):
    cases = pickle_cases(base, tmp_path)
    assert len(cases) >= 20
    ran = []
    for i, (name, setup) in enumerate(cases):
        d = tmp_path / f"case{i}"
        d.mkdir()
        marker = d / "PWNED"
        fn = setup(d, marker, i)
        run_case("pickle payloads", name, fn)
        if marker.exists():
            ran.append(name)
    assert not ran, f"payload ran: {ran}"
    assert_category("pickle payloads")


def test_manifest_is_a_pickle_falls_back_to_an_older_checkpoint(base, tmp_path):
    from omnilm.training.checkpoint import MANIFEST, latest_checkpoint

    run = copy(base["train"], tmp_path / "run")
    newest = latest_checkpoint(run / "checkpoints")
    (newest / MANIFEST).write_bytes(pickle_bytes(tmp_path / "PWNED", 0))
    fallback = latest_checkpoint(run / "checkpoints")
    assert fallback is not None and fallback != newest and not (tmp_path / "PWNED").exists()


# ---- malformed checkpoints --------------------------------------------------------------------------------


def _st_header(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _st_write(f: Path, header_text: str, body: bytes):
    h = header_text.encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + body)


def checkpoint_cases(base):
    from safetensors.torch import load_file, save_file

    def cfg_edit(**changes):
        def mutate(m):
            d = json.loads((m / "config.json").read_text())
            for k, v in changes.items():
                if v is None:
                    d.pop(k)
                else:
                    d[k] = v
            (m / "config.json").write_text(json.dumps(d))

        return mutate

    def write(name, data):
        return lambda m: (m / name).write_bytes(data)

    def index(weight_map):
        def mutate(m):
            (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

        return mutate

    def retype(key, dtype):
        def mutate(m):
            state = load_file(m / "model.safetensors")
            state[key] = (state[key] * 100).to(dtype)
            save_file(state, m / "model.safetensors")

        return mutate

    def poison(m):
        state = load_file(m / "model.safetensors")
        state["model.norm.weight"][3] = float("nan")
        save_file(state, m / "model.safetensors")

    def duplicate(m):
        header, body = _st_header(m / "model.safetensors")
        text = json.dumps(header)
        key = "model.norm.weight"
        text = text[:-1] + f', "{key}": ' + json.dumps(header[key]) + "}"
        _st_write(m / "model.safetensors", text, body)

    def header_lie(m):
        header, body = _st_header(m / "model.safetensors")
        header["model.norm.weight"]["data_offsets"] = [0, len(body) * 4]
        _st_write(m / "model.safetensors", json.dumps(header), body)

    def in_two_shards(m):
        state = load_file(m / "model.safetensors")
        (m / "model.safetensors").unlink()
        keys = sorted(state)
        save_file({k: state[k] for k in keys[:3]}, m / "a.safetensors")
        save_file({k: state[k] for k in keys[2:]}, m / "b.safetensors")
        wm = {k: "a.safetensors" for k in keys[:3]} | {k: "b.safetensors" for k in keys[3:]}
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))

    def truncate(m):
        raw = (m / "model.safetensors").read_bytes()
        (m / "model.safetensors").write_bytes(raw[: len(raw) // 2])

    deep = "[" * 100_000 + "]" * 100_000
    return [
        ("index not JSON", write("model.safetensors.index.json", b"{weight_map: nope")),
        ("index not UTF-8", write("model.safetensors.index.json", b'{"weight_map": {"\xff\xfe": 1}}')),
        ("index weight_map is a list", index(["model.safetensors"])),
        ("index names ../outside", index({"model.norm.weight": "../outside.safetensors"})),
        ("index names /etc/passwd", index({"model.norm.weight": "/etc/passwd"})),
        ("index names a missing shard", index({"model.norm.weight": "missing.safetensors"})),
        ("index JSON 100k deep", write("model.safetensors.index.json", deep.encode())),
        ("config 100k deep", write("config.json", deep.encode())),
        ("config 1M deep", write("config.json", ("{\"a\":" * 1_000_000).encode())),
        ("config is a list", write("config.json", b"[1, 2, 3]")),
        ("config not UTF-8", write("config.json", b"\xff\xfe{\x00}")),
        ("config lacks vocab_size", cfg_edit(vocab_size=None)),
        ("config hidden_size a string", cfg_edit(hidden_size="32")),
        ("config num_attention_heads float", cfg_edit(num_attention_heads=4.5)),
        ("config 10^7 layers", cfg_edit(num_hidden_layers=10**7)),
        ("config 1000 layers x 100k wide", cfg_edit(num_hidden_layers=1000, hidden_size=98304, intermediate_size=400000)),
        ("config negative vocab", cfg_edit(vocab_size=-5)),
        ("config rope_scaling a string", cfg_edit(rope_scaling="llama3")),
        ("config llama3 rope without factors", cfg_edit(rope_parameters={"rope_type": "llama3"})),
        ("int64 tensor where a float belongs", retype("model.layers.0.mlp.up_proj.weight", torch.int64)),
        ("bool tensor where a float belongs", retype("model.norm.weight", torch.bool)),
        ("duplicate tensor name", duplicate),
        ("tensor in two shards", in_two_shards),
        ("header offsets past the file", header_lie),
        ("truncated safetensors", truncate),
        ("NaN weight with check_weights", poison),
    ]  # fmt: skip


def test_malformed_checkpoints_are_typed_errors(base, tmp_path):
    cases = checkpoint_cases(base)
    assert len(cases) >= 15
    for i, (name, mutate) in enumerate(cases):
        m = copy(base["llama"], tmp_path / f"m{i}")
        mutate(m)
        check = name.endswith("check_weights")
        run_case("checkpoints", name, lambda m=m, check=check: omnilm.load(m, check_weights=check))
    assert_category("checkpoints")


SIGLIP = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
          "num_attention_heads": 4, "image_size": 32, "patch_size": 8}  # fmt: skip
WHISPER = {"model_type": "whisper", "d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 4,
           "encoder_ffn_dim": 64, "num_mel_bins": 80, "max_source_positions": 1500}  # fmt: skip


def test_malformed_encoder_and_codec_configs(base, tmp_path):
    """Types, layer counts and sizes implied by a config (a position table of 10^10 patches) are refused
    before anything is built; weights never opened."""
    cases = [("siglip", SIGLIP, p) for p in ({"hidden_size": "32"}, {"num_hidden_layers": 10**7},
                                             {"image_size": 10**6}, {"intermediate_size": 10**9})]  # fmt: skip
    cases += [("whisper", WHISPER, p) for p in ({"d_model": "32"}, {"encoder_layers": 10**7}, {"max_source_positions": 10**9})]  # fmt: skip
    cases += [("codec", None, p) for p in ({"image_size": "16"}, {"codebook_size": 10**12}, {"num_res_blocks": 10**6},
                                           {"channels": 10**6})]  # fmt: skip
    for i, (kind, cfg, patch) in enumerate(cases):
        if kind == "codec":
            d = copy(base["codec"], tmp_path / f"c{i}")
            meta = json.loads((d / "omnilm_codec.json").read_text())
            meta["config"].update(patch)
            (d / "omnilm_codec.json").write_text(json.dumps(meta))
            fn = lambda d=d: omnilm.load_codec(d)  # noqa: E731
        else:
            d = tmp_path / f"e{i}"
            d.mkdir()
            (d / "config.json").write_text(json.dumps({**cfg, **patch}))
            fn = lambda d=d: omnilm.load_encoder(d)  # noqa: E731
        run_case("checkpoints", f"{kind} config {patch}", fn, ok=lambda r: False)
    assert_category("checkpoints")


def test_mixed_precision_is_cast_and_nan_loads_only_unchecked(base, tmp_path):
    from safetensors.torch import load_file, save_file

    m = copy(base["llama"], tmp_path / "m")
    state = load_file(m / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"].half()
    save_file(state, m / "model.safetensors")
    model = omnilm.load(m)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    out = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3)  # no dtype-mismatch matmul
    assert out.shape == (1, 6)
    state["model.norm.weight"][0] = float("inf")
    save_file(state, m / "model.safetensors")
    omnilm.load(m)  # unchecked: loads
    with pytest.raises(OmniLMError, match="NaN or Inf"):
        omnilm.load(m, check_weights=True)


# ---- malformed media ---------------------------------------------------------------------------------------


def _mutations(seeds: dict[str, bytes], n: int, rng: random.Random, extra: list) -> list[tuple[str, bytes]]:
    """n cases: the hand-made `extra` ones, then truncations, bit flips and byte splices of the seeds."""
    out = list(extra)
    names = sorted(seeds)
    i = 0
    while len(out) < n:
        name = names[i % len(names)]
        data = bytearray(seeds[name])
        op = ("truncate", "flip", "splice", "zero")[(i // len(names)) % 4]
        if op == "truncate":
            data = data[: rng.randrange(1, len(data))]
        elif op == "flip":
            for _ in range(rng.choice((1, 2, 8, 64))):
                pos = rng.randrange(len(data))
                data[pos] ^= 1 << rng.randrange(8)
        elif op == "splice":
            pos = rng.randrange(len(data))
            data[pos : pos + rng.randrange(1, 64)] = rng.randbytes(rng.randrange(1, 64))
        else:
            pos = rng.randrange(min(64, len(data)))
            data[pos : pos + 4] = b"\xff\xff\xff\x7f"  # a header field set to 2^31-1
        out.append((f"{name} {op} #{i}", bytes(data)))
        i += 1
    return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int, h: int, rows: bytes | None = None) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    raw = rows if rows is not None else b"".join(b"\x00" + bytes(3 * w) for _ in range(h))
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b"")  # fmt: skip


def image_cases(n: int, rng: random.Random):
    arr = np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    seeds = {}
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        seeds[fmt.lower()] = buf.getvalue()
    bomb_rows = zlib.compress(bytes(7000 * 3 + 1) * 7000, 9)  # 49M pixels, 150 KB compressed
    extra = [
        ("png header claims 100000x100000", _png(100_000, 100_000, b"")),
        (
            "png 7000x7000 zeros (under the pixel limit)",
            b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 7000, 7000, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", bomb_rows)
            + _png_chunk(b"IEND", b""),
        ),  # fmt: skip
        ("png width 0", _png(0, 10, b"")),
        ("png header only", _png(8, 8)[:33]),
        ("gif claims 65535x65535", b"GIF89a" + struct.pack("<HH", 65535, 65535) + b"\x00\x00\x00;"),
        ("bmp claims 2^31 wide", b"BM" + bytes(16) + struct.pack("<ii", 2**31 - 1, 2**31 - 1) + bytes(30)),
        ("jpeg SOI only", b"\xff\xd8\xff"),
        ("empty", b""),
        ("random bytes", rng.randbytes(4096)),
        ("webp header only", b"RIFF\x00\x00\x00\x00WEBPVP8 "),
    ]
    return _mutations(seeds, n, rng, extra)


def _load_and_process_image(data: bytes):
    from omnilm.processing.image import ImageProcessor, load_image

    img = load_image(data)
    return ImageProcessor(size=(32, 32))([img])


def _wav_bytes(rate=16000, channels=1, seconds=0.2, fmt="WAV", subtype=None):
    t = np.arange(int(rate * seconds)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    x = np.repeat(x[:, None], channels, 1)
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def _wav_header_lie(rate=None, channels=None, data_size=None) -> bytes:
    data = bytearray(_wav_bytes())
    if channels is not None:
        data[22:24] = struct.pack("<H", channels)
    if rate is not None:
        data[24:28] = struct.pack("<I", rate)
    if data_size is not None:
        pos = data.index(b"data")
        data[pos + 4 : pos + 8] = struct.pack("<I", data_size)
    return bytes(data)


def _flac_streaminfo_lie(rate: int, channels: int, total: int) -> bytes:
    """A real FLAC whose STREAMINFO claims another rate, channel count and length (8 ch x 192 kHz x 590 s)."""
    data = bytearray(_wav_bytes(fmt="FLAC"))
    # STREAMINFO body starts at 8: 2+2 block sizes, 3+3 frame sizes, then 20 bits rate | 3 bits ch-1 |
    # 5 bits bps-1 | 36 bits total samples
    pos = 8 + 10
    bps = ((data[pos + 2] & 0x01) << 4 | data[pos + 3] >> 4) + 1
    packed = (rate << 44) | ((channels - 1) << 41) | ((bps - 1) << 36) | total
    data[pos : pos + 8] = packed.to_bytes(8, "big")
    return bytes(data)


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
            crc &= 0xFFFFFFFF
    return crc


def _ogg_rate_lie(rate: int) -> bytes:
    """A real Ogg Vorbis file whose identification header claims `rate` Hz, page CRC recomputed."""
    data = bytearray(_wav_bytes(fmt="OGG"))
    nseg = data[26]
    body = 27 + nseg
    assert data[body : body + 7] == b"\x01vorbis"
    data[body + 12 : body + 16] = struct.pack("<I", rate)
    page_len = body + sum(data[27 : 27 + nseg])
    data[22:26] = b"\0\0\0\0"
    data[22:26] = struct.pack("<I", _ogg_crc(bytes(data[:page_len])))
    return bytes(data)


def audio_cases(n: int, rng: random.Random):
    seeds = {"wav": _wav_bytes(), "flac": _wav_bytes(fmt="FLAC"), "ogg": _wav_bytes(fmt="OGG"),
             "wav-stereo-44k": _wav_bytes(rate=44100, channels=2, seconds=0.1)}  # fmt: skip
    extra = [
        ("wav rate 2^31-1", _wav_header_lie(rate=2**31 - 1)),
        ("ogg rate 2^31-1", _ogg_rate_lie(2**31 - 1)),
        ("ogg rate 22050 (a consistent lie)", _ogg_rate_lie(22050)),
        ("wav rate 44101 (odd ratio)", _wav_header_lie(rate=44101)),
        ("wav rate 1", _wav_header_lie(rate=1)),
        ("wav 65535 channels", _wav_header_lie(channels=65535)),
        ("wav 0 channels", _wav_header_lie(channels=0)),
        ("wav data size 4 GiB", _wav_header_lie(data_size=0xFFFFFFF0)),
        ("flac 8 ch x 192 kHz x 590 s", _flac_streaminfo_lie(192000, 8, 192000 * 590)),
        ("flac rate 655350 x 2^35 samples", _flac_streaminfo_lie(655350, 2, 2**35)),
        ("flac 1 Hz", _flac_streaminfo_lie(1, 1, 100)),
        ("ogg header only", _wav_bytes(fmt="OGG")[:58]),
        ("mp3 sync then noise", b"\xff\xfb\x90\x00" + rng.randbytes(2000)),
        ("id3 then noise", b"ID3\x04\x00\x00\x00\x00\x00\x00" + rng.randbytes(2000)),
        ("empty", b""),
        ("RIFF WAVE only", b"RIFF\x04\x00\x00\x00WAVE"),
    ]
    return _mutations(seeds, n, rng, extra)


def _load_audio(data: bytes):
    from omnilm.processing.audio import load_audio

    return load_audio(data)


def _pdf_many_images(pages: int, side: int) -> bytes:
    """`pages` pages, each drawing its own side x side RGB image (Flate of zeros: tiny on disk)."""
    stream = zlib.compress(bytes(side * side * 3), 9)
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b""]
    kids = []
    for _ in range(pages):
        img = len(objs) + 1
        objs.append(b"<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace /DeviceRGB "
                    b"/BitsPerComponent 8 /Filter /FlateDecode /Length %d >>\nstream\n%s\nendstream"
                    % (side, side, len(stream), stream))  # fmt: skip
        content = b"q 100 0 0 100 72 600 cm /Im0 Do Q"
        objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
        page = len(objs) + 1
        objs.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /XObject << /Im0 %d 0 R >> >> /Contents %d 0 R >>" % (img, img + 1))  # fmt: skip
        kids.append(b"%d 0 R" % page)
    objs[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(kids), pages)
    return _pdf_file(objs)


def _pdf_file(objs: list[bytes]) -> bytes:
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i + 1, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return bytes(out)


def _pdf_deep(depth: int) -> bytes:
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R /X " + b"[" * depth + b"]" * depth + b" >>"]  # fmt: skip
    content = b"BT /F1 12 Tf 72 700 Td (deep) Tj ET"
    objs.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    return _pdf_file(objs)


def pdf_cases(n: int, rng: random.Random):
    from omnilm.processing.documents import build_pdf

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    seeds = {"text pdf": build_pdf([[("text", "Invoice 42"), ("text", "total 17")], [("text", "page two")]]),
             "image pdf": build_pdf([[("text", "before"), ("image", img), ("text", "after")]])}  # fmt: skip
    big = seeds["text pdf"]
    extra = [
        ("200 pages x one 4096^2 image each", _pdf_many_images(200, 4096)),
        ("20 pages x one 2048^2 image each", _pdf_many_images(20, 2048)),
        ("one 5000^2 image", _pdf_many_images(1, 5000)),
        ("arrays nested 100k deep", _pdf_deep(100_000)),
        ("arrays nested 1000 deep", _pdf_deep(1000)),
        ("no %%EOF", big[:-7]),
        ("xref offsets lie", re.sub(rb"startxref\n\d+", b"startxref\n999999999", big)),
        ("page count lies", big.replace(b"/Count 2", b"/Count 2000000000")),
        ("image width lies", seeds["image pdf"].replace(b"/Width 16", b"/Width 1600000")),
        ("image length lies", re.sub(rb"/Length \d+ >>\nstream", b"/Length 99999999 >>\nstream", seeds["image pdf"])),
        ("header only", b"%PDF-1.4\n%%EOF\n"),
        ("random after header", b"%PDF-1.4\n" + rng.randbytes(4000) + b"\n%%EOF\n"),
    ]  # fmt: skip
    return _mutations(seeds, n, rng, extra)


def _load_document(data: bytes, name="<bytes>"):
    from omnilm.processing.documents import load_document

    return load_document(data)


def document_cases(n: int, rng: random.Random):
    seeds = {
        "doc.md": b"# Title\n\nSome *markdown* with a [link](http://x) and `code`.\n\n- one\n- two\n",
        "doc.csv": b'name,qty,price\nwidget,3,1.50\n"quoted, field",1,2\n',
        "doc.json": json.dumps({"a": [1, 2, {"b": "c"}], "d": "e" * 50}).encode(),
        "doc.html": b"<!doctype html><html><body><h1>Hi</h1><p>text &amp; more</p><script>x()</script></body></html>",
        "doc.txt": "plain text, with UTF-8: caf\u00e9 \u2603\n".encode(),
    }
    extra = [
        ("JSON 10k deep", b"[" * 10_000 + b"]" * 10_000),
        ("JSON 1M deep", b"[" * 1_000_000),
        ("JSON objects 100k deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("HTML 1M unterminated tags", b"<!doctype html>" + b"<a" * 1_000_000),
        ("HTML 200k unterminated comments", b"<html>" + b"<!--" * 200_000),
        ("HTML 200k open quotes", b"<html>" + b'<a href="' * 200_000),
        ("HTML 300k nested divs", b"<html>" + b"<div>" * 300_000),
        ("one 10 MB word", b"a" * 10_000_000),
        ("60 MB one line", b"word " * 12_000_000),
        ("3 MB of words (over the text limit)", b"many words here " * 200_000),
        ("1.5 MB of words (under it)", b"many words here " * 100_000),
        ("UTF-16 CSV with a BOM", "\ufeffa,b\n1,2\n".encode("utf-16")),
        ("UTF-16 BE", "\ufeffhello".encode("utf-16-be")),
        ("NUL bytes", b"text\x00more"),
        ("invalid UTF-8", b"caf\xe9 au lait"),
        ("lone BOM", b"\xef\xbb\xbf"),
        ("CSV one 1 MB field", b'"' + b"x" * 1_000_000 + b'"\n'),
        ("markdown 1M backticks", b"`" * 1_000_000),
    ]
    return _mutations(seeds, n, rng, extra)


MEDIA = {
    "image": (image_cases, _load_and_process_image),
    "audio": (audio_cases, _load_audio),
    "pdf": (pdf_cases, _load_document),
    "documents": (document_cases, _load_document),
}


# seconds each (decoding a 49-Mpixel PNG, scipy's first import, megabytes of markup): the full run only
HEAVY = {"png 7000x7000 zeros (under the pixel limit)", "wav rate 44101 (odd ratio)", "20 pages x one 2048^2 image each",
         "HTML 1M unterminated tags", "HTML 300k nested divs", "JSON 1M deep", "60 MB one line", "one 5000^2 image",
         "200 pages x one 4096^2 image each", "arrays nested 100k deep"}  # fmt: skip


def _run_media(kind: str, n: int, seed: int, fast: bool = False):
    make, fn = MEDIA[kind]
    cases = make(n, random.Random(seed))
    assert len(cases) >= n
    if fast:
        cases = [(name, data) for name, data in cases if name not in HEAVY]
    for name, data in cases:
        run_case(kind, name, lambda data=data: fn(data))
    assert_category(kind)


@pytest.mark.parametrize("kind", sorted(MEDIA))
def test_malformed_media_fast(kind):
    _run_media(kind, 16, seed=1, fast=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(MEDIA))
def test_malformed_media_full(kind):
    _run_media(kind, 60, seed=2)


# ---- through the real CLI (one `error:` line, no traceback, no payload) -----------------------------------


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "omnilm", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.mark.slow
def test_cli_payloads_and_media_give_one_error_line(base, tmp_path):
    cases = []
    m = copy(base["omni"], tmp_path / "m")
    (m / "model.safetensors").write_bytes(pickle_bytes(tmp_path / "PWNED", 2))
    tok = str(ROOT / "omnilm" / "assets" / "tokenizer")
    cases.append(
        (
            "generate",
            ["generate", "--model", str(m), "--tokenizer", tok, "--prompt", "hi", "--max-new-tokens", "2"],
        )
    )
    cases.append(("convert", ["convert", "--model", str(m), "--out", str(tmp_path / "o")]))
    run = copy(base["train"], tmp_path / "run")
    from omnilm.training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run / "checkpoints")
    (ckpt / "dcp" / ".metadata").write_bytes(pickle_bytes(tmp_path / "PWNED", 3))
    _rewrite_manifest(ckpt)
    cfg_file = tmp_path / "train.json"
    cfg_file.write_text(json.dumps(_train_cfg(base["llama"], steps=6).to_dict()))
    cases.append(("train --resume", ["train", "--config", str(cfg_file), "--out", str(run), "--resume"]))
    for name, data in [("flac.flac", _flac_streaminfo_lie(192000, 8, 192000 * 590)),
                       ("x.mp3", b"\xff\xfb\x90\x00" + bytes(range(256)) * 8),
                       ("bomb.pdf", _pdf_many_images(200, 4096)),
                       ("tags.html", b"<html>" + b"<a" * 1_000_000)]:  # fmt: skip
        f = tmp_path / name
        f.write_bytes(data)
        flag = "--audio" if name.endswith((".flac", ".mp3")) else "--file"
        cases.append((name, ["generate", "--model", "demo", "--prompt", "hi", flag, str(f)]))
    stats = REPORT.setdefault("cli", {"cases": 0, "typed": 0, "ok": 0, "failures": [], "lines": []})
    for name, args in cases:
        t0 = time.perf_counter()
        r = _cli(*args)
        stats["cases"] += 1
        stats["typed" if r.returncode == 2 else "ok"] += 1
        stats["lines"].append((name, round(time.perf_counter() - t0, 2), r.stderr.strip()[-300:]))
        _write_report()
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        assert r.returncode in (0, 2), (name, r.returncode, r.stderr[-2000:])
        if r.returncode == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), (name, r.stderr[-2000:])
        if name in ("generate", "convert", "train --resume"):  # the payload is named and refused
            assert r.returncode == 2 and "refused without" in r.stderr, (name, r.stderr[-2000:])
    assert not (tmp_path / "PWNED").exists()


# ---- the source itself ---------------------------------------------------------------------------------------


# The one pickle reader: the server and its own engine process talking over the socketpair the server
# made (as multiprocessing itself does); no file, socket or request of anyone else reaches it.
PICKLE_IPC = {"omnilm/serve/worker.py"}


def test_no_unsafe_deserialisation_in_the_package():
    bad = []
    for f in sorted((ROOT / "omnilm").rglob("*.py")):
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if str(f.relative_to(ROOT)) in PICKLE_IPC and re.search(
                r"\bpickle\.loads\(self\.conn|\bpickle\.loads\(conn", code
            ):
                continue
            if re.search(r"\bpickle\.loads?\(|\bcPickle\b|\bdill\b|trust_remote_code", code):
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
            if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                bad.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("preset", ["tiny", "llama-3.2-1b", "llama-3.1-8b"])
def test_size_bound_agrees_with_the_planner(preset):
    from omnilm.config import get_preset
    from omnilm.convert.validate import estimate_decoder_params
    from omnilm.plan import count_params

    dcfg = get_preset(preset).decoder
    exact = count_params(ModelConfig(decoder=dcfg))["total"]
    assert abs(estimate_decoder_params(dcfg) - exact) <= 1e-3 * exact


def test_json_depth_is_linear_and_exact():
    from omnilm.convert.validate import json_depth

    assert json_depth('{"a": [1, {"b": "]]]]"}]}') == 3
    assert json_depth("[" * 200_000) == 200_000
    assert json_depth('"[[[["') == 0
    assert math.isfinite(json_depth(""))


# ---- a training process killed during a save ------------------------------------------------------------


def _kill_cfg(model_dir):
    return _train_cfg(model_dir, steps=8, save_every=2)


def _child_train(out: Path, model_dir: Path, kill_at: int, count_file: Path):
    """In a forked child: train to step 6 (saves at 2, 4, 6), SIGKILL itself at save event `kill_at`
    (events: before and after every mkdir, rename, delete, file write and DCP/weights/manifest write
    made while a save runs). Writes the number of events seen if it was not killed."""
    import pathlib
    import signal

    from omnilm.training import checkpoint, loop

    events = {"n": 0, "in_save": False}

    def tick():
        if events["in_save"]:
            events["n"] += 1
            if events["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    def hooked(fn):
        def wrapper(*args, **kwargs):
            tick()
            out = fn(*args, **kwargs)
            tick()
            return out

        return wrapper

    for owner, name in [(pathlib.Path, "mkdir"), (pathlib.Path, "rename"), (pathlib.Path, "write_text"),
                        (pathlib.Path, "write_bytes"), (shutil, "rmtree"), (checkpoint.dcp, "save"),
                        (checkpoint, "_save_weights"), (checkpoint, "save_file"), (checkpoint, "_write_manifest")]:  # fmt: skip
        setattr(owner, name, hooked(getattr(owner, name)))
    save = loop.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        events["in_save"] = True
        try:
            return save(*args, **kwargs)
        finally:
            events["in_save"] = False

    loop.save_checkpoint = save_checkpoint
    loop.train(_kill_cfg(model_dir), out, max_steps=6, progress=False)
    count_file.write_text(str(events["n"]))


def _fork(fn, *args) -> int:
    """Run fn(*args) in a forked child; returns the signal that ended it (0: it finished)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return os.WTERMSIG(status)
    assert os.WEXITSTATUS(status) == 0, "the training child failed"
    return 0


@pytest.mark.slow
def test_kill_during_save_and_resave_resumes_bit_exact(base, tmp_path):
    """>= 20 kill points during saves into an empty run directory and >= 20 during re-saves over
    complete checkpoints: --resume always continues from the newest complete checkpoint and ends with
    the losses and weights of an uninterrupted run."""
    from omnilm.training.checkpoint import latest_checkpoint
    from omnilm.training.loop import Trainer

    model_dir = base["llama"]
    ref = Trainer(_kill_cfg(model_dir), tmp_path / "ref", progress=False)
    ref_losses = [m["loss"] for m in ref.train()]
    ref_state = {k: v.clone() for k, v in ref.model.state_dict().items()}

    count = tmp_path / "count"
    assert _fork(_child_train, tmp_path / "dry", model_dir, 0, count) == 0
    total = int(count.read_text())
    prepopulated = tmp_path / "dry"  # complete checkpoints at steps 4 and 6
    assert total >= 40, total
    points = sorted({1 + round(i * (total - 1) / 23) for i in range(24)})
    results = {"save": [], "re-save": []}
    for scenario in results:
        for k in points:
            out = tmp_path / f"{scenario}-{k}"
            if scenario == "re-save":
                shutil.copytree(prepopulated, out)
            killed = _fork(_child_train, out, model_dir, k, tmp_path / "unused")
            newest = latest_checkpoint(out / "checkpoints")
            trainer = Trainer(_kill_cfg(model_dir), out, resume=True, progress=False)
            start = trainer.step
            history = trainer.train()
            assert killed == 9, (scenario, k, killed)
            assert (newest is None and start == 0) or start == int(newest.name.rsplit("-", 1)[1])
            if scenario == "re-save":
                assert start == 6, (k, start)  # the complete step-6 it replaces never vanishes
            assert [m["loss"] for m in history] == ref_losses[start:], (scenario, k, start)
            state = trainer.model.state_dict()
            assert all(torch.equal(state[key], ref_state[key]) for key in ref_state), (scenario, k)
            results[scenario].append((k, start))
            shutil.rmtree(out)
    REPORT["kill during save"] = {"events_per_run": total, **{s: r for s, r in results.items()}}
    _write_report()
    assert all(len(r) >= 20 for r in results.values())


# ---- the shared non-finite step guard -----------------------------------------------------------------


def test_one_nan_sample_leaves_vq_and_codec_weights_finite():
    from omnilm.config import AudioCodecConfig, ImageVQConfig
    from omnilm.training.codec import synth_tones, train_audio_codec, train_image_vq

    torch.manual_seed(0)
    images = torch.rand(32, 3, 16, 16) * 2 - 1
    images[5, 0, 3, 3] = float("nan")  # in about one batch of four: those steps are skipped, not applied
    cfg = ImageVQConfig(image_size=16, downsample=4, codebook_size=16, code_dim=8, channels=8)
    vq, _ = train_image_vq(images, cfg, steps=12, batch_size=8, device="cpu")
    clips = synth_tones(8, sample_rate=8000, seconds=0.05)
    clips[3, 0, 10] = float("nan")
    acfg = AudioCodecConfig(sample_rate=8000, channels=8, strides=[2, 4], n_q=2, codebook_size=16, dim=16)
    codec, _ = train_audio_codec(clips, acfg, steps=8, batch_size=4, device="cpu")
    for model in (vq, codec):
        tensors = [t for t in itertools.chain(model.parameters(), model.buffers()) if t.is_floating_point()]
        assert all(torch.isfinite(t).all() for t in tensors)


def test_guard_stops_after_max_bad_steps_in_a_row():
    from omnilm.training.guard import NonFiniteGuard

    guard = NonFiniteGuard(max_bad_steps=2, what="unit")
    assert guard.observe(1, 1.0, 1.0) and not guard.observe(2, float("nan"), 1.0)
    assert guard.observe(3, 0.5, 1.0) and guard.streak == 0
    assert not guard.observe(4, 1.0, float("inf"))
    with pytest.raises(OmniLMError, match="unit: 2 non-finite steps in a row"):
        guard.observe(5, float("nan"), float("nan"))
