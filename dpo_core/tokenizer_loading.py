"""Load a model's tokenizer, without importing torch whenever its tokenizer_config.json allows.

`transformers.AutoTokenizer` imports torch (it reads the model's config through modules that do), and the
API process must not. A tokenizer class backed by the `tokenizers` library does not: when
tokenizer_config.json names such a class (`tokenizer_class`, e.g. "TokenizersBackend", "LlamaTokenizerFast",
"Qwen2Tokenizer"), that class's own `from_pretrained` loads it, as AutoTokenizer would. Anything else
(no tokenizer_config.json, remote code through `auto_map`, a SentencePiece or Python tokenizer) goes through
AutoTokenizer. AutoTokenizer also overrides the named class for a few hub checkpoints whose config names a
wrong one, by model type; a checkpoint that needs that needs its tokenizer_config.json corrected here.

The trainer loads its tokenizer with this same function, so a pre-flight report sees the trainer's tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpo_core.errors import ModelLoadError, load_error

TOKENIZER_CONFIG = "tokenizer_config.json"
# Names that can be tokenizer classes: looking up anything else on the transformers module could import torch.
_CLASS_SUFFIXES = ("Tokenizer", "TokenizerFast", "TokenizersBackend")


def load_tokenizer(name: str):
    """The tokenizer of model `name` (a local directory or a hub id), with a pad token (EOS if it had none)."""
    try:
        tok = _from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        raise load_error("tokenizer of", name, err) from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer of {name!r} has no EOS token; completions must end with one")
    if tok.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id works; EOS is the usual choice.
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(name: str):
    cls = backend_class(name)
    if cls is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name)
    return cls.from_pretrained(name)


def backend_class(name: str) -> type | None:
    """The tokenizers-backed class that `name`'s tokenizer_config.json names, or None for AutoTokenizer."""
    config = _tokenizer_config(name)
    class_name = config.get("tokenizer_class") if config is not None else None
    if "auto_map" in (config or {}) or not isinstance(class_name, str) or not class_name.endswith(_CLASS_SUFFIXES):
        return None
    import transformers
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = getattr(transformers, class_name, None)  # "XTokenizerFast" names are aliases of XTokenizer
    if not (isinstance(cls, type) and issubclass(cls, TokenizersBackend)):
        return None
    # As AutoTokenizer: LlamaTokenizer builds a SentencePiece-style (Metaspace) tokenizer, but many
    # Llama 3 style checkpoints name it over a byte-level tokenizer.json, which only the generic class reads right.
    if cls.__name__ == "LlamaTokenizer" and TokenizersBackend._tokenizer_json_has_byte_level(name):
        return TokenizersBackend
    return cls


def _tokenizer_config(name: str) -> dict[str, Any] | None:
    """tokenizer_config.json of a local directory, or of a hub repository (downloaded once, then cached);
    None when there is none. OSError when a hub id cannot be reached or does not exist, ValueError when
    `name` is neither a directory nor a hub id."""
    path = Path(name) / TOKENIZER_CONFIG
    if Path(name).is_dir():
        if not path.is_file():
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            path = Path(hf_hub_download(name, TOKENIZER_CONFIG))
        except RemoteEntryNotFoundError:  # the repository holds no such file; unreachable ones raise
            return None
    config = json.loads(path.read_text(encoding="utf-8"))
    return config if isinstance(config, dict) else None
