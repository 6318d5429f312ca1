"""The `omnilm` command: a thin table of subcommands over the library.

Every user error (an OmniLMError) becomes one line `error: ...` on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import OmniLMError


def cmd_plan(args):
    from .plan import format_plan, plan_preset

    p = plan_preset(args.preset, seq_len=args.seq_len, tokens=args.tokens, gpus=args.gpus, mfu=args.mfu)
    print(json.dumps(p) if args.json else format_plan(p))


def cmd_generate(args):
    from .pipeline import Pipeline

    # Inputs are read (and refused) before the weights load: a bad file should not wait for the model.
    _check_device(args.device)
    dtype = args.dtype or ("bfloat16" if args.device and args.device.startswith("cuda") else None)
    pipe = Pipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    prompt = pipe.encode(args.prompt, args.image, args.audio, args.file)
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


def cmd_compose(args):
    from .convert.compose import compose

    compose(args.text, vision=args.vision, audio=args.audio, out=args.out)
    print(f"wrote {args.out}")


def cmd_convert(args):
    import omnilm

    model = omnilm.load(args.model, dtype=args.dtype)
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({type(model).__name__}, format {model.hf_format})")


def cmd_train(args):
    from .training.loop import cmd_train as run

    run(args)


def cmd_demo(args):
    from .demo import cmd_demo as run

    run(args)


def cmd_tokenizer_train(args):
    from .tokenizers.text import cmd_tokenizer_train as run

    run(args)


def cmd_tokenizer_train_image(args):
    from .tokenizers.vq import cmd_tokenizer_train_image as run

    run(args)


def cmd_tokenizer_train_audio(args):
    from .tokenizers.vq import cmd_tokenizer_train_audio as run

    run(args)


def _check_device(name):
    """torch reports a bad or absent device with an assertion or a long RuntimeError; say it plainly."""
    if name is None:
        return
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OmniLMError(
            f"--device {name!r} is not a device name (expected cpu, cuda, cuda:N, mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OmniLMError(f"--device {name}: CUDA is not available (torch {torch.__version__})")


def _fraction(s):
    v = float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s}")
    return v


def _non_negative(s):
    v = float(s)
    if not v >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s}")
    return v


def _positive_int(s):
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are user errors too: one line, exit code 2 (argparse would print the usage first)."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omnilm", description="Multimodal decoder-only language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("plan", help="size a preset exactly: parameters, memory, KV cache, FLOPs, GPU-days")
    p.add_argument("--preset", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--seq-len", type=_positive_int, default=None)
    p.add_argument(
        "--tokens", type=float, default=2e12, help="training tokens (default: the 88B design's 2T)"
    )
    p.add_argument("--gpus", type=_positive_int, default=8)
    p.add_argument("--mfu", type=_fraction, default=0.4)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="generate text (and images/audio) from a prompt with media")
    p.add_argument("--model", required=True, help="model directory, or 'demo' for the bundled checkpoint")
    p.add_argument("--prompt", default="")
    p.add_argument("--image", action="append", default=[])
    p.add_argument("--audio", action="append", default=[])
    p.add_argument("--file", action="append", default=[])
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_non_negative, default=0.0)
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=_fraction, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--output-image", default=None)
    p.add_argument("--output-audio", default=None)
    p.add_argument("--guidance-scale", type=_non_negative, default=None, help="CFG scale for image spans")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compose", help="build one multimodal checkpoint from pretrained parts")
    p.add_argument("--text", required=True, help="Llama directory (Hugging Face format)")
    p.add_argument("--vision", default=None, help="SigLIP/CLIP vision directory")
    p.add_argument("--audio", default=None, help="Whisper/wav2vec2 directory")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser(
        "convert", help="load a checkpoint and write it back (Hugging Face format where one exists)"
    )
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default=None)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="train from a YAML config")
    p.add_argument("--config", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--max-steps", type=_positive_int, default=None)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train and evaluate the tiny multimodal demo model offline")
    p.add_argument("--quick", action="store_true", help="a reduced run for tests")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tokenizer", help="train tokenizers")
    tok = p.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    t = tok.add_parser("train", help="train a byte-level BPE text tokenizer")
    t.add_argument("--input", nargs="+", required=True)
    t.add_argument("--vocab-size", type=_positive_int, required=True)
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_train)
    # [tokenizer subcommands]
    t = tok.add_parser("train-image", help="train the VQ-VAE image tokenizer; prints PSNR and codebook usage")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--demo", action="store_true", help="the bundled handwritten digits, upscaled")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=_positive_int, default=500)
    t.add_argument("--image-size", type=_positive_int, default=32)
    t.add_argument("--codebook-size", type=_positive_int, default=256)
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_tokenizer_train_image)
    t = tok.add_parser("train-audio", help="train the audio codec (residual VQ); prints SI-SNR")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio", help="folder of wav/flac/ogg files (searched recursively)")
    src.add_argument("--demo", action="store_true", help="synthesized DTMF tones")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=_positive_int, default=800)
    t.add_argument("--sample-rate", type=_positive_int, default=16000)
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_tokenizer_train_audio)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
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
