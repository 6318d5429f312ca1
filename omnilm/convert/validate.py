"""Checks on checkpoint files before anything is built or assigned: a checkpoint is untrusted input.

- JSON (configs, indexes): bounded size and nesting depth, UTF-8, an object at the top; a pickle
  where JSON belongs is named as such and never unpickled.
- Shard indexes: `weight_map` maps tensor names to safetensors files that resolve inside the
  checkpoint directory (no `../`, no absolute paths, no pickle shards).
- safetensors headers are parsed here too, so a duplicate tensor name (which the reader would
  silently resolve to one of them) or a tensor in two shards is an error.
- Configs: JSON types and ranges of the sizes, and a parameter count estimated from the config alone
  (no modules built: a config with 10^7 layers is refused before the first one exists) that must fit
  the machine's memory.
- dtypes: an integer or bool tensor where the model has a float parameter is refused; floats of
  mixed precision are cast to the checkpoint's dominant float dtype (consistently, never a matmul
  crash later). `--check-weights` / `check_weights=True` also scans every tensor for NaN and Inf.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import json
import os
import re
import struct
import types
import typing
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError

MAX_JSON_BYTES = 64 * 1024**2  # configs and indexes are kilobytes; a 70B index is ~100 KB
MAX_JSON_DEPTH = 64  # real configs nest 4 deep
MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors reader's own bound
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # protocol 2+ pickles; torch.save zips
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8",
                      "U8", "U16", "U32", "U64", "BOOL", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"}  # fmt: skip

# Upper bounds on config sizes: ~10x the largest published models, far below what breaks arithmetic.
DECODER_RANGES = {
    "vocab_size": (1, 4_000_000),
    "hidden_size": (1, 131_072),
    "num_layers": (1, 2_048),
    "num_heads": (1, 4_096),
    "num_kv_heads": (1, 4_096),
    "intermediate_size": (1, 1_048_576),
    "head_dim": (1, 4_096),
    "max_seq_len": (1, 1 << 24),
}
HF_DECODER_KEYS = {  # config.json key -> DecoderConfig field
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
}

_check_weights = contextvars.ContextVar("omnilm_check_weights", default=False)


# ---- JSON -----------------------------------------------------------------------------------------------


def read_json(path, error=CheckpointError) -> dict:
    """A JSON object from `path`, or `error` naming the file and what is wrong with it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise error(f"{path}: {size} bytes; JSON files here are bounded to {MAX_JSON_BYTES} bytes")
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    return parse_json(data, str(path), error)


def parse_json(data: bytes, source: str, error=CheckpointError) -> dict:
    if data.startswith(PICKLE_MAGIC):
        raise error(f"{source}: a pickle (or torch.save) file where JSON belongs; refused without loading it")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise error(f"{source}: JSON nested {depth} deep; the bound is {MAX_JSON_DEPTH}")
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{source}: not valid JSON ({e})") from None
    except _DuplicateKey as e:
        raise error(f"{source}: key {e.args[0]!r} appears twice") from None
    if not isinstance(value, dict):
        raise error(f"{source}: expected a JSON object at the top, got {type(value).__name__}")
    return value


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """Maximum bracket nesting outside strings, in linear time (the parser itself recurses)."""
    brackets = _BRACKETS.findall(_STRING.sub("", text))
    steps = (1 if b in "[{" else -1 for b in brackets)
    return max(itertools.accumulate(steps, initial=0))


# ---- shard files ---------------------------------------------------------------------------------------


def index_files(path: Path, index: dict, index_file: Path) -> list[str]:
    """The shard files an index names, each checked to be a safetensors file inside `path`."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            f"{index_file}: 'weight_map' must be a non-empty object of tensor name -> file, "
            f"got {type(weight_map).__name__}"
        )
    root = path.resolve()
    files = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index_file}: weight_map[{key!r}] must be a file name, got {name!r}")
        target = (path / name).resolve()
        if Path(name).is_absolute() or not target.is_relative_to(root):
            raise CheckpointError(
                f"{index_file}: weight_map[{key!r}] names {name!r}, outside the checkpoint directory"
            )
        if not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{index_file}: weight_map[{key!r}] names {name!r}; only .safetensors shards are loaded "
                "(pickle checkpoints are refused: they can run code)"
            )
        files.add(name)
    return sorted(files)


def safetensors_header(f: Path) -> dict:
    """The parsed header of a safetensors file: tensor name -> {dtype, shape, data_offsets}."""
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f}: {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                if head.startswith(PICKLE_MAGIC):  # a real header length never looks like these
                    raise CheckpointError(
                        f"{f}: a pickle (or torch.save) file, not safetensors; refused without loading it"
                    )
                raise CheckpointError(
                    f"{f}: header length {n} exceeds the file ({size} bytes) or {MAX_HEADER_BYTES}"
                )
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"{f}: cannot be read ({e.strerror or e})") from None
    header = parse_json(raw, f"{f} (safetensors header)")
    body = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict) or info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{f}: tensor {key!r} has no known dtype in the header")
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (_ints(offsets, 2) and _ints(shape) and 0 <= offsets[0] <= offsets[1] <= body):
            raise CheckpointError(f"{f}: tensor {key!r} has a malformed shape or offsets in the header")
    return header


def _ints(x, n=None) -> bool:
    return (
        isinstance(x, list)
        and (n is None or len(x) == n)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x)
    )


def check_shards(path: Path, files: list[str]):
    """Headers of every shard parsed; a tensor name in two shards is refused."""
    owner = {}
    for name in files:
        for key in safetensors_header(path / name):
            if key != "__metadata__" and owner.setdefault(key, name) != name:
                raise CheckpointError(f"{path}: tensor {key!r} appears in both {owner[key]} and {name}")


def read_safetensors(f) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (adapters, rng state), header checked first."""
    from safetensors.torch import load_file

    f = Path(f)
    safetensors_header(f)
    try:
        return load_file(f)
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None


# ---- configs ---------------------------------------------------------------------------------------------


def check_hf_decoder(d: dict, source: str):
    """Types and ranges of a Llama-style config.json before DecoderConfig is built from it."""
    for key, field in HF_DECODER_KEYS.items():
        if key not in d:
            raise CheckpointError(f"{source}: missing {key!r}")
        _check_int(d[key], key, DECODER_RANGES[field], source)
    for key, field in (("num_key_value_heads", "num_kv_heads"), ("head_dim", "head_dim"),
                       ("max_position_embeddings", "max_seq_len")):  # fmt: skip
        if d.get(key) is not None:
            _check_int(d[key], key, DECODER_RANGES[field], source)
    for key in ("rms_norm_eps", "rope_theta", "initializer_range"):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
            raise CheckpointError(f"{source}: {key} must be a non-negative number, got {v!r}")
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if d.get(key) is not None and not isinstance(d[key], bool):
            raise CheckpointError(f"{source}: {key} must be true or false, got {d[key]!r}")
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise CheckpointError(f"{source}: {key} must be an object, got {d[key]!r}")


def _check_int(v, key, bounds, source):
    lo, hi = bounds
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"{source}: {key} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise CheckpointError(f"{source}: {key} {v} is outside [{lo}, {hi}]")


def check_config_types(cfg, source: str, where: str = ""):
    """Every field of a (nested) config dataclass holds a value of its annotated type."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        name = f"{where}{f.name}"
        if dataclasses.is_dataclass(v):
            check_config_types(v, source, name + ".")
        elif not _is_instance(v, hints[f.name]):
            raise ConfigError(f"{source}: {name} must be {_type_name(hints[f.name])}, got {v!r}")


def _is_instance(v, tp) -> bool:
    if tp is typing.Any:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(v, a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return isinstance(v, (list, tuple)) and all(any(_is_instance(x, a) for a in args) for x in v)
    if origin is dict:
        return isinstance(v, dict)
    if tp is type(None):
        return v is None
    if tp is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if isinstance(tp, type):
        return isinstance(v, tp) or dataclasses.is_dataclass(tp)
    return True


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_decoder_ranges(dcfg, source: str):
    for field, bounds in DECODER_RANGES.items():
        _check_int(getattr(dcfg, field), field, bounds, source)


def estimate_decoder_params(dcfg) -> int:
    """Parameters of a decoder from its config alone (no modules built): embeddings, head, and per
    layer the q/k/v/o projections, the MLP and two norms (biases left out: a bound, within 0.1% of
    plan.count_params, which builds the model on the meta device)."""
    D, hd = dcfg.hidden_size, dcfg.head_dim
    attn = D * hd * (2 * dcfg.num_heads + 2 * dcfg.num_kv_heads)
    mlp = (3 if dcfg.mlp == "swiglu" else 2) * D * dcfg.intermediate_size
    head = 0 if dcfg.tie_embeddings else dcfg.vocab_size * D
    return dcfg.vocab_size * D + head + dcfg.num_layers * (attn + mlp + 2 * D) + D  # + the final norm


def memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound from the machine
        return 1 << 50


def check_model_size(dcfg, source: str, dtype=None):
    """Refuse a config whose weights would not fit this machine, before any module is built."""
    check_decoder_ranges(dcfg, source)
    n = estimate_decoder_params(dcfg)
    per = 4 if dtype in (None, torch.float32) else 2  # plan.BYTES_PER_PARAM's fp32 / bf16 (plan imports us)
    need, have = n * per, memory_bytes()
    if need > have:
        raise CheckpointError(
            f"{source}: the config describes ~{n / 1e9:.1f}B decoder parameters ({need / 2**30:.0f} GiB), "
            f"more than this machine's {have / 2**30:.0f} GiB of memory"
        )


MAX_LAYERS = 2_048  # any field counting layers or blocks: a build loop of 10^7 is a hang, not a model
MAX_INT_FIELD = 1 << 31


def check_config_ranges(cfg, source: str, where: str = ""):
    """Every int of a (nested) config dataclass within a sane range, layer counts within MAX_LAYERS."""
    for f in dataclasses.fields(cfg):
        v, name = getattr(cfg, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(v):
            check_config_ranges(v, source, name + ".")
        elif isinstance(v, int) and not isinstance(v, bool):
            hi = MAX_LAYERS if ("layers" in f.name or "blocks" in f.name) else MAX_INT_FIELD
            if not -MAX_INT_FIELD <= v <= hi:
                raise ConfigError(f"{source}: {name} {v} is outside the supported range (at most {hi})")


def check_build(build, source: str, dtype=None):
    """Build the module on the meta device (no memory) and refuse it when its parameters and buffers
    would not fit this machine: the sizes that config fields imply (a position table of 10^10
    patches, a codebook of 10^12 codes) are known before anything is allocated."""
    try:
        with torch.device("meta"):
            module = build()
    except (ConfigError, CheckpointError):
        raise
    except Exception as e:  # a config the model code cannot build at all
        raise ConfigError(f"{source}: invalid config ({type(e).__name__}: {e})") from None
    seen, n = set(), 0
    for t in itertools.chain(module.parameters(), module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel()
    per = 4 if dtype in (None, torch.float32) else 2
    if n * per > memory_bytes():
        raise CheckpointError(
            f"{source}: the config describes ~{n / 1e9:.1f}B parameters and buffers ({n * per / 2**30:.0f} GiB), "
            f"more than this machine's {memory_bytes() / 2**30:.0f} GiB of memory"
        )


def check_config(cfg, source: str, build, dtype=None):
    """Types, ranges, then the size of `build()` on the meta device, before anything real is built."""
    with config_errors(source):
        check_config_types(cfg, source)
        check_config_ranges(cfg, source)
    check_build(build, source, dtype)


@contextlib.contextmanager
def config_errors(source: str):
    """A config that breaks the dataclasses' arithmetic (a string where a number belongs) is a ConfigError."""
    try:
        yield
    except (TypeError, KeyError, AttributeError, OverflowError, ZeroDivisionError) as e:
        raise ConfigError(f"{source}: invalid config ({type(e).__name__}: {e})") from None


# ---- tensors ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def checking_weights(on: bool = True):
    """Within this block every strict load also scans the tensors for NaN and Inf."""
    token = _check_weights.set(bool(on) or _check_weights.get())
    try:
        yield
    finally:
        _check_weights.reset(token)


PLAIN_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_state(expected: dict, state: dict, source: str, params: set | None = None) -> dict:
    """dtype checks (and the NaN/Inf scan when asked) on a state whose keys and shapes match `expected`.
    Returns the state with lower-precision floats cast to the dominant float dtype. Only plain float
    tensors of `params` (the module's parameters; all keys when None) take part: a quantized layer's
    buffers (fp8 codes, their fp32 scales) keep the dtypes they are stored in."""
    bad = [
        f"{k} ({state[k].dtype})"
        for k, v in expected.items()
        if v.is_floating_point() and not state[k].is_floating_point()
    ]
    if bad:
        raise CheckpointError(
            f"{source}: integer or bool tensors where the model has float parameters: {', '.join(bad[:8])}"
        )
    mixed = {k for k, v in state.items() if v.dtype in PLAIN_FLOATS and (params is None or k in params)}
    sizes: dict[torch.dtype, int] = {}
    for k in mixed:
        sizes[state[k].dtype] = sizes.get(state[k].dtype, 0) + state[k].numel()
    if len(sizes) > 1:
        main = max(sizes, key=sizes.get)
        state = {k: v.to(main) if k in mixed and v.dtype != main else v for k, v in state.items()}
    if _check_weights.get():
        check_finite(state, source)
    return state


def check_finite(state: dict, source: str):
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: NaN or Inf values in {', '.join(bad[:8])}" +
                              (f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""))  # fmt: skip
