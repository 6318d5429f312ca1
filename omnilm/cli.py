"""The `omnilm` command: a thin table of subcommands over the library.

Every user error (an OmniLMError) becomes one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, OmniLMError


def cmd_plan(args):
    from .plan import format_plan, parse_bytes, plan_preset

    gpu_mem = parse_bytes(args.gpu_mem) if args.gpu_mem else None
    p = plan_preset(
        args.preset,
        seq_len=args.seq_len,
        tokens=args.tokens,
        gpus=args.gpus,
        mfu=args.mfu,
        gpu_mem=gpu_mem,
        context=args.context,
    )
    print(json.dumps(p) if args.json else format_plan(p))


def cmd_generate(args):
    from .convert.validate import checking_weights
    from .pipeline import Pipeline

    # Inputs are read (and refused) before the weights load: a bad file should not wait for the model.
    _check_device(args.device)
    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat (a system message belongs to a chat)")
    _check_output(args.output_image, "--output-image", _image_extensions(), ".png")
    _check_output(args.output_audio, "--output-audio", _audio_extensions(), ".wav")
    _check_videos(args.video)
    dtype = args.dtype or ("bfloat16" if args.device and args.device.startswith("cuda") else None)
    with checking_weights(args.check_weights):
        pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=dtype, tokenizer=args.tokenizer)
    if args.output_image and hasattr(pipe.processor, "generation_grid"):  # Emu3: its image grammar
        return _emu3_image(args, pipe)
    # a video reads like any file: its frames and sound go before the prompt
    if args.chat:  # one user turn (after --system), rendered as the server renders a chat request
        parts = [{"type": "image", "image": p} for p in args.image] + [
            {"type": "audio", "audio": p} for p in args.audio
        ]
        parts += [{"type": "file", "file": p} for p in args.file + args.video] + [
            {"type": "text", "text": args.prompt}
        ]
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = pipe.encode_chat(system + [{"role": "user", "content": parts}])
    else:
        prompt = pipe.encode(args.prompt, args.image, args.audio, args.file + args.video)
    config = pipe.config(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
    )
    try:
        req = pipe.submit(prompt, config=config)
        if args.stream:
            for piece in req.pieces():
                print(piece, end="", flush=True)
            print(flush=True)
        out = req.result()
        if not args.stream:
            print(out.text)
    finally:
        pipe.close()
    if args.output_image or args.output_audio:
        _write_media(out, args)


def _check_videos(paths):
    from .processing.documents import read_limited, sniff_kind
    from .processing.video import MAX_VIDEO_BYTES

    for path in paths:
        data, name = read_limited(path, MAX_VIDEO_BYTES, "video")
        kind = sniff_kind(data[:4096], name)
        if kind != "video":
            raise OmniLMError(f"--video {name}: not a video container (it reads as {kind}); use --file")


def _emu3_image(args, pipe):
    from .generation.emu3_grammar import generate_image

    width, height = args.image_size or (int(pipe.processor.image_area**0.5),) * 2
    pipe.processor.generation_grid(height, width)  # a bad size fails before the weights load
    image, _, _ = generate_image(
        pipe.model, pipe.processor, args.prompt, height, width, guidance_scale=args.guidance_scale,
        temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )  # fmt: skip
    image.save(args.output_image)
    print(f"wrote {args.output_image}")


def _image_size(s):
    try:
        w, h = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, got {s!r}") from None
    return w, h


def _write_media(out, args):
    if args.output_image:
        if not out.images:
            raise OmniLMError(
                "--output-image: the model generated no image span (try a prompt that asks for one)"
            )
        out.images[0].save(args.output_image)
        print(f"wrote {args.output_image}")
    if args.output_audio:
        if not out.audio:
            raise OmniLMError("--output-audio: the model generated no audio span")
        import soundfile

        wave, rate = out.audio[0]
        soundfile.write(args.output_audio, wave, rate)
        print(f"wrote {args.output_audio}")


def cmd_serve(args):
    import os

    from .serve import serve

    _check_device(args.device)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get("OMNILM_API_KEY"),
          max_queue=args.max_queue, max_batch=args.max_batch, device=args.device, dtype=args.dtype,
          allow_media_url=args.allow_media_url, allow_local_media=args.allow_local_media,
          threads=args.threads, prepack=not args.no_prepack, engine=args.engine)  # fmt: skip


def cmd_chat(args):
    from .serve.backend import Backend, GenerationConfig
    from .serve.terminal import run

    _check_device(args.device)
    backend = Backend.load(args.model, device=args.device, dtype=args.dtype)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    run(backend, cfg, media_dir=args.media_dir)


def cmd_compose(args):
    from .convert.compose import compose

    if args.fusion == "cross-attention":
        from .convert.mllama import compose_cross_attention

        if args.vision is None or args.audio is not None:
            raise OmniLMError("--fusion cross-attention takes --text and --vision (no --audio)")
        compose_cross_attention(
            args.text,
            args.vision,
            every=args.every,
            out=args.out,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
        )
    else:
        compose(
            args.text,
            vision=args.vision,
            audio=args.audio,
            out=args.out,
            tokenizer=args.tokenizer,
            overwrite=args.overwrite,
        )
    print(f"wrote {args.out}")


def cmd_convert(args):
    from .api import _dtype, resolve
    from .convert.convert import convert_checkpoint
    from .convert.validate import checking_weights

    tokenizer = resolve(args.tokenizer) if args.tokenizer is not None else None
    with checking_weights(args.check_weights):
        model = convert_checkpoint(
            resolve(args.model),
            args.out,
            dtype=_dtype(args.dtype),
            overwrite=args.overwrite,
            tokenizer=tokenizer,
        )
    print(f"wrote {args.out} ({type(model).__name__}, format {model.config.hf_format})")


def cmd_quantize(args):
    from .api import load, resolve
    from .convert.hf import checkpoint_dir
    from .quant import get_scheme, quantize_model
    from .quant.io import save_quantized

    scheme = get_scheme(args.scheme, args.group_size)  # refused before the weights load
    source = checkpoint_dir(resolve(args.model))
    model = load(source, dtype=args.dtype)
    names = quantize_model(
        model,
        scheme,
        encoders=args.encoders,
        head=args.include_head,
        embeddings=args.include_embeddings,
        activations=args.activations,
    )
    tensors, files = save_quantized(model, args.out, source=source)
    print(
        f"wrote {args.out} ({args.scheme}, {len(names)} layers, {tensors:,} B of tensors, {files:,} B of files)"
    )


def cmd_eval(args):
    from .eval import evaluate

    result, line = evaluate(args.model, text=args.text, tasks=args.tasks, quantize=args.quantize,
                            context=args.context, stride=args.stride, max_new_tokens=args.max_new_tokens)  # fmt: skip
    print(json.dumps(result) if args.json else line)


def cmd_train(args):
    import torch.distributed as dist

    from .threads import set_threads
    from .training.config import load_train_config
    from .training.loop import train

    n, why = set_threads(args.threads)
    print(f"threads: {n} ({why})", flush=True)
    cfg = load_train_config(args.config)
    out = Path(args.out or cfg.out)
    history = train(cfg, out, max_steps=args.max_steps, resume=args.resume)
    if history and (not dist.is_initialized() or dist.get_rank() == 0):
        first, last = history[0], history[-1]
        print(f"steps {first['step']}-{last['step']}: loss {first['loss']:.4f} -> {last['loss']:.4f}; "
              f"checkpoints in {out / 'checkpoints'}")  # fmt: skip


def cmd_demo(args):
    from .demo import demo_command

    demo_command(args.out, train=args.train, quick=args.quick, json_output=args.json, threads=args.threads)


def cmd_tokenizer_train(args):
    from .tokenizers.text import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.out)
    print(f"trained byte-level BPE: vocab {tok.vocab_size}, written to {args.out}")


def cmd_tokenizer_train_image(args):
    from .tokenizers.vq import train_image_tokenizer

    _check_device(args.device)
    train_image_tokenizer(args.out, args.steps, images=getattr(args, "images", None),
                          image_size=getattr(args, "image_size", None), channels=getattr(args, "channels", None),
                          codebook_size=getattr(args, "codebook_size", None), device=args.device)  # fmt: skip


def cmd_tokenizer_train_audio(args):
    from .tokenizers.vq import train_audio_tokenizer

    _check_device(args.device)
    train_audio_tokenizer(args.out, args.steps, audio=getattr(args, "audio", None),
                          sample_rate=getattr(args, "sample_rate", None), channels=getattr(args, "channels", None),
                          clips=getattr(args, "clips", None), device=args.device)  # fmt: skip


def _check_device(name):
    """torch reports a bad or absent device with an assertion or a long RuntimeError; say it plainly."""
    if name is None:
        return
    import re

    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", name):
        raise OmniLMError(f"--device {name!r} is not a device name (expected cpu, cuda, cuda:N, mps)")
    import torch

    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise OmniLMError(f"--device {name}: CUDA is not available (torch {torch.__version__})")
        index, count = int(name.partition(":")[2] or 0), torch.cuda.device_count()
        if index >= count:
            raise OmniLMError(f"--device {name}: there is no such GPU ({count} visible: cuda:0-{count - 1})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise OmniLMError(
            f"--device mps: MPS is not available (it needs Apple silicon, macOS 12.3+ and a torch built with it; "
            f"torch {torch.__version__})"
        )


def _image_extensions() -> set[str]:
    """Extensions Pillow can write (.png, .jpg, .webp, ...)."""
    from PIL import Image

    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def _audio_extensions() -> set[str]:
    import soundfile

    return {"." + fmt.lower() for fmt in soundfile.available_formats()}


def _check_output(path, option, extensions, example):
    """An output the run could not write is refused before the run, not after it."""
    if path is None:
        return
    import os
    from pathlib import Path

    out = Path(path)
    if out.is_dir() or path.endswith(("/", os.sep)):
        raise OmniLMError(f"{option} {path}: is a directory; give a file name such as {out / 'out'}{example}")
    if out.suffix.lower() not in extensions:
        common = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tiff", ".wav", ".flac", ".ogg", ".mp3")
        known = ", ".join([e for e in common if e in extensions] + [f"(or {len(extensions)} in all)"])
        raise OmniLMError(
            f"{option} {path}: unknown extension {out.suffix or '(none)'!r}; expected one of {known}"
        )
    parent = out.absolute().parent
    if not parent.is_dir():
        raise OmniLMError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OmniLMError(f"{option} {path}: directory {parent} is not writable")


def _fraction(s):
    v = float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s}")
    return v


def _non_negative(s):
    v = float(s)
    if not 0 <= v < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {s}")
    return v


def _positive_float(s):
    v = float(s)
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {s}")
    return v


def _seed(s):
    v = int(s)
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**63), got {s}")
    return v


def _vocab_size(s):
    from .tokenizers.text import SPECIAL_TOKENS

    v, least = int(s), 256 + len(SPECIAL_TOKENS)
    if v < least:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= {least} (256 bytes + special tokens), got {s}"
        )
    return v


DTYPES = ["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]


def _positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one line, exit code 2 (argparse would print the usage first)."""

    def error(self, message):
        print("error: " + " ".join(f"{self.prog}: {message} (see --help)".split()), file=sys.stderr)
        sys.exit(2)


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        empty = default is None or default is False or default in ([], "", argparse.SUPPRESS)
        if "default" in text or empty or not action.option_strings:
            return text
        return (
            f"{text} (default: {default:g})" if isinstance(default, float) else f"{text} (default: {default})"
        )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import PRESETS

    presets = ", ".join(PRESETS)
    parser = _Parser(
        prog="omnilm",
        description="Multimodal decoder-only language models: text, images, audio and documents in; "
        "text, images and audio out. Models are local directories, Hugging Face hub ids "
        "(owner/name[@revision], through the hub cache; HF_HUB_OFFLINE=1 reads the cache only) or "
        "'demo', the bundled model.",
        epilog="Bad input prints one line `error: ...` on stderr and exits with code 2. "
        "`omnilm COMMAND --help` describes a command.",
        formatter_class=_Help,
    )
    parser.add_argument("--version", action="version", version=f"omnilm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("plan", help="size a preset exactly: parameters, memory, KV cache, FLOPs, GPU-days")
    p.add_argument("--preset", required=True, metavar="NAME", help=f"one of: {presets}")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument(
        "--seq-len",
        type=_positive_int,
        default=None,
        help="training sequence length (default: the context, at most 8192)",
    )
    p.add_argument(
        "--tokens", type=_positive_float, default=2e12, help="training tokens (default: the 88B design's 2T)"
    )
    p.add_argument("--gpus", type=_positive_int, default=8, help="GPUs for the FSDP and GPU-days figures")
    p.add_argument("--mfu", type=_fraction, default=0.4, help="model FLOPs utilization, in (0, 1]")
    p.add_argument("--gpu-mem", default=None, help="e.g. 141GB: per quantization scheme, do weights + KV fit")
    p.add_argument("--context", type=_positive_int, default=None, help="KV context for --gpu-mem")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="generate text (and images/audio) from a prompt with media")
    p.add_argument(
        "--model", required=True, help="model directory, hub id, or 'demo' for the bundled checkpoint"
    )
    p.add_argument("--prompt", default="", help="the prompt text; <|image|> / <|audio|> place the media")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the checkpoint's chat template (as `serve` does)",
    )
    p.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    p.add_argument(
        "--image", action="append", default=[], metavar="FILE", help="an image (PNG, JPEG, ...; repeatable)"
    )
    p.add_argument(
        "--audio",
        action="append",
        default=[],
        metavar="FILE",
        help="an audio clip (WAV, FLAC, OGG; repeatable)",
    )
    p.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="FILE",
        help="a document or media file: PDF, XLSX, ODS, DOCX, ODT, PPTX, EPUB, HTML, Markdown, CSV, JSON, text, image, audio or video (repeatable)",
    )
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="FILE",
        help="video file (MP4/MOV/WebM/MKV/AVI): frames at the processor's rate, with their sound",
    )
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=_non_negative, default=0.0, help="0 is greedy decoding")
    p.add_argument("--top-k", type=_positive_int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=_fraction, default=None, help="nucleus sampling mass, in (0, 1]")
    p.add_argument(
        "--seed", type=_seed, default=None, help="sampling seed, 0 <= S < 2**63 (default: unseeded)"
    )
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument(
        "--output-image",
        default=None,
        metavar="FILE",
        help="write the first generated image (.png, .jpg, ...)",
    )
    p.add_argument(
        "--image-size", type=_image_size, default=None, help="WIDTHxHEIGHT of a generated image (Emu3)"
    )
    p.add_argument(
        "--output-audio",
        default=None,
        metavar="FILE",
        help="write the first generated audio (.wav, .flac, .ogg)",
    )
    p.add_argument("--guidance-scale", type=_non_negative, default=None, help="CFG scale for image spans")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="weights dtype (default: bfloat16 on CUDA, else the checkpoint's)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="tokenizer directory, for a model directory without one",
    )
    p.add_argument("--check-weights", action="store_true", help="refuse weights holding NaN or Inf")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a web chat page at /")
    p.add_argument("--model", required=True, help="model directory, or 'demo' for the bundled checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, help="required on every route but /health (or OMNILM_API_KEY)")
    p.add_argument("--max-queue", type=_positive_int, default=64, help="waiting requests; more get 429")
    p.add_argument("--max-batch", type=_positive_int, default=16, help="requests decoded together")
    p.add_argument("--allow-media-url", action="store_true", help="fetch http(s) image URLs")
    p.add_argument("--allow-local-media", default=None, metavar="DIR", help="read file:// media under DIR")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.add_argument(
        "--threads", type=_positive_int, default=None,
        help="torch threads (default: OMP_NUM_THREADS, else the physical cores less one, kept for HTTP)",
    )  # fmt: skip
    p.add_argument("--no-prepack", action="store_true",
                   help="keep eager nn.Linear (default on CPU: weights packed once for oneDNN, equal to float rounding)")  # fmt: skip
    p.add_argument("--engine", choices=("auto", "process", "thread"), default="auto",
                   help="where the model runs: a process of its own, or a thread beside HTTP (auto: a process on a CPU of 2+ cores)")  # fmt: skip
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("chat", help="chat in the terminal (/image, /audio, /file, /system, /reset, /save)")
    p.add_argument("--model", required=True, help="model directory, or 'demo' for the bundled checkpoint")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, help="tokens per answer at most")
    p.add_argument("--temperature", type=_non_negative, default=0.0, help="0 is greedy")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--media-dir", default=".", help="where generated images/audio are written")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("compose", help="build one multimodal checkpoint from pretrained parts")
    p.add_argument("--text", required=True, help="Llama directory or hub id (Hugging Face format)")
    p.add_argument("--vision", default=None, help="SigLIP/CLIP vision directory or hub id")
    p.add_argument("--audio", default=None, help="Whisper/wav2vec2 directory or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: --text's)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--fusion",
        choices=("placeholder", "cross-attention"),
        default="placeholder",
        help="placeholder tokens (LLaVA) or gated cross-attention layers (Llama-3.2-Vision)",
    )
    p.add_argument(
        "--every",
        type=_positive_int,
        default=4,
        help="cross-attention: one new layer after every N text layers",
    )
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser(
        "convert", help="load a checkpoint and write it back (Hugging Face format where one exists)"
    )
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="convert the weights (default: keep)")
    p.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer to write with it (default: --model's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--check-weights", action="store_true", help="refuse weights holding NaN or Inf")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="write a low-bit copy of a model (compressed-tensors layout)")
    p.add_argument(
        "--model", required=True, help="model directory, hub id, or 'demo' for the bundled checkpoint"
    )
    p.add_argument("--scheme", required=True, help="int8, int4, fp8, nvfp4 or mxfp4")
    p.add_argument("--group-size", type=_positive_int, default=None, help="int4 group: 32, 64 or 128")
    p.add_argument("--encoders", action="store_true", help="quantize the vision/audio encoders too")
    p.add_argument("--include-head", action="store_true", help="quantize the output head too (untied models)")
    p.add_argument(
        "--include-embeddings", action="store_true", help="quantize the token embeddings too (untied models)"
    )
    p.add_argument(
        "--activations", choices=["int8"], default=None, help="int8: dynamic per-token int8 activations"
    )
    p.add_argument("--dtype", default=None, help="dtype of the unquantized parts and the scales")
    p.add_argument("--out", required=True, help="output directory (written whole or not at all)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity of a text file, or exact-match accuracy of a task file")
    p.add_argument(
        "--model", required=True, help="model directory, hub id, or 'demo' for the bundled checkpoint"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text file: strided perplexity")
    src.add_argument("--tasks", help="JSONL: {prompt, answer, image?, audio?, file?} per line")
    p.add_argument("--context", type=_positive_int, default=None, help="window (default: the model's)")
    p.add_argument(
        "--stride", type=_positive_int, default=None, help="window step (default: half the window)"
    )
    p.add_argument("--quantize", default=None, help="quantize on the fly with this scheme")
    p.add_argument("--max-new-tokens", type=_positive_int, default=16, help="answer length limit (--tasks)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument(
        "--config", required=True, metavar="FILE", help="training YAML (see examples/train_tiny.yaml)"
    )
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: the config's `out`)")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop after this many steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads (default: OMP_NUM_THREADS, else the physical cores available to the process)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="evaluate (or --train) the tiny multimodal demo model offline")
    p.add_argument(
        "--train", action="store_true", help="train from scratch (default: evaluate the bundled checkpoint)"
    )
    p.add_argument("--quick", action="store_true", help="a reduced training run for tests (implies --train)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="run directory")
    p.add_argument(
        "--threads", type=_positive_int, default=None, help="intra-op threads (default: the usable cores)"
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tokenizer", help="train tokenizers")
    tok = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    t = tok.add_parser("train", help="train a byte-level BPE text tokenizer")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    t.add_argument(
        "--vocab-size",
        type=_vocab_size,
        required=True,
        help="vocabulary size: 256 bytes + the special tokens at least",
    )
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.set_defaults(func=cmd_tokenizer_train)
    # [tokenizer subcommands]
    t = tok.add_parser("train-image", help="train the VQ-VAE image tokenizer; prints PSNR and codebook usage")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", metavar="DIR", help="folder of images (searched recursively)")
    src.add_argument("--demo", action="store_true", help="the bundled handwritten digits, upscaled")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument("--steps", type=_positive_int, default=500, help="training steps")
    t.add_argument("--image-size", type=_positive_int, default=32, help="side of the square training images")
    t.add_argument("--codebook-size", type=_positive_int, default=256, help="codes in the codebook")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cpu)")
    t.set_defaults(func=cmd_tokenizer_train_image)
    t = tok.add_parser("train-audio", help="train the audio codec (residual VQ); prints SI-SNR")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio", metavar="DIR", help="folder of wav/flac/ogg files (searched recursively)")
    src.add_argument("--demo", action="store_true", help="synthesized DTMF tones")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument("--steps", type=_positive_int, default=800, help="training steps")
    t.add_argument("--sample-rate", type=_positive_int, default=16000, help="Hz the clips are resampled to")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cpu)")
    t.set_defaults(func=cmd_tokenizer_train_audio)
    _describe(parser)
    return parser


def _describe(parser):
    """Every subcommand's --help opens with its one-line summary and shows defaults, however it was
    added (blocks above may use sub.add_parser directly)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for summary in action._choices_actions:
                sub = action.choices[summary.dest]
                if not sub.description and summary.help:
                    sub.description = summary.help[:1].upper() + summary.help[1:] + "."
                sub.formatter_class = _Help
                _describe(sub)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `omnilm`: what it can do, not an error
        parser.print_help()
        return 0
    try:
        args.func(args)
    except OmniLMError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `omnilm ... | head`
        return 0
    # a path the user named cannot be read or written (no such folder, permissions, disk full)
    except OSError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
