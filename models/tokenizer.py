"""Byte-level BPE tokenizer: training, encode/decode, and its files in the Hugging Face layout.

A thin layer over Hugging Face `tokenizers`: the same `tokenizer.json` feeds training, every
runtime and GGUF metadata. Byte-level with the GPT-2 split (llama.cpp's `gpt2` model, `gpt-2`
pre-tokenizer), so any Unicode text round-trips exactly. `encode` adds no special tokens; callers
put `<|bos|>` and `<|endoftext|>` where a sequence starts and ends. This module does not know
about corpora or models.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from models.confine import confined, read_bytes, read_json
from models.errors import EdgesmithError

TOKENIZER_LIMIT = 256 << 20  # the largest Hub tokenizer.json files are ~20 MB
BOS, EOT, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
SPECIALS = (BOS, EOT, PAD)
MIN_VOCAB = 256 + len(SPECIALS)  # every byte plus the specials


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos: str = BOS, eos: str = EOT, pad: str | None = PAD,
                 source: str = "tokenizer.json"):
        self.tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.bos_id = self._id(bos, source)
        self.eos_id = self._id(eos, source)
        self.pad_id = self._id(pad, source) if pad is not None else None

    def _id(self, token: str, source: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise EdgesmithError(f"{source}: special token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialized tokenizer: two tokenizers with equal fingerprints give equal ids."""
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    # ------------------------------------------------------------------------- files

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` and a `tokenizer_config.json` that `AutoTokenizer` reads."""
        directory = Path(directory)
        self.tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint or artifact directory: its `tokenizer.json` (and `tokenizer_config.json`
        when present), each a regular file inside the directory of bounded size."""
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.exists() and not path.is_symlink():
            raise EdgesmithError(f"{path}: missing")
        raw = read_bytes(confined(directory, "tokenizer.json", what="tokenizer"), TOKENIZER_LIMIT)
        try:
            tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise EdgesmithError(f"{path}: not a valid tokenizer.json (not UTF-8: {e.reason})") from None
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise EdgesmithError(f"{path}: not a valid tokenizer.json ({_first_line(e)})") from None
        specials = {"bos": BOS, "eos": EOT, "pad": PAD}
        config_path = directory / "tokenizer_config.json"
        if config_path.exists() or config_path.is_symlink():
            config = read_json(confined(directory, "tokenizer_config.json", what="tokenizer config"))
            for key in specials:
                value = config.get(f"{key}_token", specials[key])
                specials[key] = value.get("content") if isinstance(value, dict) else value
                if not isinstance(specials[key], (str, type(None))) or (key != "pad" and specials[key] is None):
                    raise EdgesmithError(f"{config_path}: {key}_token must be a token string, got {value!r:.60}")
        if specials["pad"] is not None and tok.token_to_id(specials["pad"]) is None:
            specials["pad"] = None  # many HF tokenizers have no pad token; we never need one to run
        return cls(tok, specials["bos"], specials["eos"], specials["pad"], source=str(path))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None,
                    show_progress: bool = True) -> Tokenizer:
    """Train byte-level BPE to `vocab_size` tokens (specials included) on an iterator of texts."""
    if vocab_size < MIN_VOCAB:
        raise EdgesmithError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
                             f"{MIN_VOCAB} (256 bytes + {len(SPECIALS)} specials {', '.join(SPECIALS)})")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return Tokenizer(tok)
