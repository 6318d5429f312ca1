"""`omnilm convert`: a checkpoint loaded and written back whole (Hugging Face format where one exists),
with the files its directory needs carried over (see files.py)."""

from __future__ import annotations

from .files import TOKENIZER_FILES, atomic_dir, carry, check_out_dir, require_tokenizer


def convert_checkpoint(src, out, dtype=None, overwrite: bool = False, tokenizer=None):
    """Load `src` (a directory or hub id) and write it to `out` in Hugging Face format where one exists,
    with every file the directory needs; returns the model. dtype: a torch dtype or None."""
    from .export import remember_source, write_export_files
    from .formats import HF_FORMATS, load
    from .hf import checkpoint_dir
    from .hub import local_path

    check_out_dir(out, overwrite)
    src_dir = checkpoint_dir(local_path(src))
    tok_dir = local_path(tokenizer) if tokenizer is not None else None
    if tok_dir is not None:
        require_tokenizer(tok_dir, what="--tokenizer directory")
    model = load(src_dir, dtype=dtype)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        carry(src_dir, tmp)  # the source's tokenizer and configs win over any default a save wrote
        if tok_dir is not None:
            carry(tok_dir, tmp, names=TOKENIZER_FILES + ("tokenizer_config.json", "chat_template.jinja"))
        # what the carried files lack (OmniLM's chat template, eos ids, dtype): convert/export.py
        write_export_files(remember_source(model, tmp), tmp, hf_format=model.hf_format in HF_FORMATS)
    return remember_source(model, out)
