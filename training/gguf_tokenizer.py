"""The tokenizer of an imported GGUF: made to behave as the file says, saved so that it
reloads unchanged, and checked for that before the import is published.

transformers builds the tokenizer from the file's tokenizer.ggml.* entries (vocabulary,
merges or scores, token types, pre-tokenizer name); these helpers cover what it leaves
out and what a plain save_pretrained would not bring back."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError

# Texts the saved tokenizer must encode exactly as the one read from the GGUF: runs of
# spaces, newlines, digits, accents, emoji and a special token are where pipelines differ.
TOKENIZER_PROBES = ("Hello world! It's 2024-05-17; 12345 + 678 = 13023.",
                    "def f(x):\n    return x  # two  spaces\n\n\tand a tab",
                    "Ça coûte 3,50 € — naïve café, 東京, 😀👍",
                    " leading space and trailing ")


def apply_tokenizer_flags(tokenizer, flags: dict[str, bool]) -> None:
    """Whether to add BOS/EOS, as the file says (tokenizer.ggml.add_bos_token, ...).
    transformers' GGUF reader ignores these entries, and llama.cpp honours them: without
    this a Llama 2/3 file's tokenizer would stop prepending <s> / <|begin_of_text|>."""
    for name, value in flags.items():
        token = tokenizer.bos_token if name == "add_bos_token" else tokenizer.eos_token
        if token is not None and getattr(tokenizer, name, None) != value:
            try:
                setattr(tokenizer, name, value)  # rebuilds the post-processor
            except AttributeError:  # a tokenizer class without the switch
                pass


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save the tokenizer as transformers built it from the file's tokenizer.ggml.* entries.

    tokenizer.json holds that whole pipeline (normalizer, pre-tokenizer, decoder, special
    tokens). A model-specific class named in tokenizer_config.json would rebuild part of
    it on load (its own split regex), which need not be the file's, so the generic fast
    class is named instead; it is also one that every transformers version knows."""
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def check_tokenizer(folder: Path, tokenizer, source: Path) -> None:
    """The finished directory's tokenizer, loaded the way transformers and vLLM load it,
    must encode like the GGUF's. transformers 5 ignores the saved class for some model
    types (qwen2 always gets Qwen2Tokenizer, with Qwen2's split regex and NFC), so a
    qwen2 file carrying another tokenizer would silently tokenize differently."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(folder)
    special = tokenizer.eos_token or ""
    for text in TOKENIZER_PROBES:
        if reloaded(text + special)["input_ids"] != tokenizer(text + special)["input_ids"]:
            raise ModelError(f"--gguf: {source}: transformers would load the imported tokenizer "
                             f"as {type(reloaded).__name__}, which encodes {text!r} differently "
                             f"from the GGUF's tokenizer")
