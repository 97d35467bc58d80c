"""The tokenizers of the families in GGUF: llama.cpp splits every text as the model's own tokenizer.json does.

Each family's tokenizer is built here the way its authors' files are made (no downloads): byte-level BPE trained by
`tokenizers` with GPT-2's, Llama-3's, Qwen2's and SmolLM's pre-tokenizers as their tokenizer.json files spell them,
and real SentencePiece BPE models (byte fallback) trained by `sentencepiece` and converted by transformers' own
LlamaTokenizerFast (Llama-2 / Mistral, legacy and Metaspace forms) and GemmaTokenizerFast. A GGUF carrying each goes
through llama.cpp's tokenizer (llama-cpp-python, vocab only), and through `import-gguf` back to tokenizer.json."""

from __future__ import annotations

import glob
import os
import sysconfig
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from models.errors import EdgesmithError
from models.llama import ModelConfig, Transformer
from models.tokenizer import SPECIALS, Tokenizer
from toolchain.export.formats.gguf import write_gguf
from toolchain.gguf_import import import_gguf
from toolchain.gguf_vocab import byte_level_split

TEXTS = [
    "Hello world", " Hello  world\n\n\tx", "12345 3.14159 2024-12-05 1000000", "I'M don't We'RE they've SHE'LL",
    "café naïve 日本語 テスト 😀 Ünïcödé Ωμέγα", "def f(x):\n    return x ** 2  # comment\n", "   leading spaces",
    "trailing   ", "\n\nnew\r\nlines\n", "a" * 50, "<s> is not special here, nor <|bos|>",
]
BYTE_LEVEL = ("gpt-2", "llama-bpe", "qwen2", "smollm")
SENTENCEPIECE = ("spm-legacy", "spm-metaspace", "gemma")


def corpus() -> list[str]:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:40]
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    return texts + ["café naïve 日本語 テスト Ünïcödé 12345 3.14159 I'M don't We'RE they've"] * 20


def byte_level(pre: str, out: Path) -> Path:
    tok = HFTokenizer(models.BPE())
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json has it
    tok.pre_tokenizer = byte_level_split(pre)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=700, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if pre == "llama-bpe":  # Llama-3's tokenizer.json: a word that is a token is taken whole
        tok.model.ignore_merges = True
    Tokenizer(tok).save(out)
    return out


def sentencepiece(kind: str, out: Path) -> Path:
    import sentencepiece as spm
    from transformers import GemmaTokenizerFast, LlamaTokenizerFast

    text = out / "corpus.txt"
    text.write_text("\n".join(line for t in corpus() for line in t.splitlines() if line.strip()))
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if kind == "gemma" else {}  # Gemma's layout
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out / "sp"), vocab_size=700, model_type="bpe", byte_fallback=True,
        split_digits=True, add_dummy_prefix=kind != "gemma", allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", minloglevel=2, **ids)
    if kind == "gemma":
        hf = GemmaTokenizerFast(vocab_file=str(out / "sp.model"), from_slow=True)
    else:  # transformers writes Llama-2's form (Prepend + Replace normalizers) or the newer Metaspace one
        hf = LlamaTokenizerFast(vocab_file=str(out / "sp.model"), from_slow=True, legacy=kind == "spm-legacy",
                                add_prefix_space=True)
    hf.save_pretrained(out)
    for name in ("sp.model", "sp.vocab", "corpus.txt", "tokenizer.model"):  # tokenizer.json alone, as we keep it
        (out / name).unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def family_gguf(tmp_path_factory):
    """kind -> (its tokenizer, a one-layer GGUF carrying it)."""
    root = tmp_path_factory.mktemp("vocab")
    made = {}

    def get(kind: str):
        if kind not in made:
            out = root / kind
            out.mkdir()
            (byte_level if kind in BYTE_LEVEL else sentencepiece)(kind, out)
            tok = Tokenizer.load(out)
            vocab = (tok.vocab_size + 31) // 32 * 32
            torch.manual_seed(0)
            model = Transformer(ModelConfig(vocab_size=vocab, dim=64, n_layers=1, n_heads=2, n_kv_heads=1,
                                            ffn_dim=64, max_seq_len=64))
            write_gguf(root / f"{kind}.gguf", model, tok, "fp32", 64)
            made[kind] = (tok, root / f"{kind}.gguf")
        return made[kind]
    return get


@pytest.mark.parametrize("kind, model, pre", [*((k, "gpt2", k) for k in BYTE_LEVEL),
                                               *((k, "llama", None) for k in SENTENCEPIECE)])
def test_llama_cpp_splits_every_text_as_the_family_tokenizer_does(family_gguf, kind, model, pre):
    # setup
    import gguf
    import llama_cpp

    tok, path = family_gguf(kind)
    fields = gguf.GGUFReader(str(path)).fields
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    # execute
    ours = [tok.encode(t) for t in TEXTS]
    theirs = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in TEXTS]  # specials in text: as HF
    # assert: the kind and split llama.cpp reads, then every text's ids (text after text, not a sample)
    assert fields["tokenizer.ggml.model"].contents() == model
    assert (fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else None) == pre
    if kind == "spm-metaspace":  # Metaspace prepends "▁" only where a text (or the text after a special token)
        differ = [i for i, t in enumerate(TEXTS) if t.startswith(" ") or "<s> " in t]  # does not start with a
        # space; llama.cpp's add_space_prefix always does
        assert differ and all(ours[i] != theirs[i] for i in differ)
        ours, theirs = [ids for i, ids in enumerate(ours) if i not in differ], \
            [ids for i, ids in enumerate(theirs) if i not in differ]
    assert ours == theirs
    assert [llm.detokenize(ids).decode() for ids in ours[:5]] == [tok.decode(ids) for ids in ours[:5]] or \
        model == "llama"  # (llama.cpp's SentencePiece detokenizer drops the first space; the ids are the contract)


@pytest.mark.parametrize("kind", [*BYTE_LEVEL, *SENTENCEPIECE])
def test_import_gguf_rebuilds_the_tokenizer_that_splits_and_joins_alike(family_gguf, kind, tmp_path):
    # setup
    import llama_cpp

    tok, path = family_gguf(kind)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    # execute
    back = Tokenizer.load(import_gguf(path, tmp_path / "ckpt"))
    # assert: the file's tokenizer is what llama.cpp runs (the Metaspace form's first space included)
    assert [back.encode(t) for t in TEXTS] == [llm.tokenize(t.encode(), add_bos=False, special=True) for t in TEXTS]
    assert [back.decode(tok.encode(t)) for t in TEXTS] == [tok.decode(tok.encode(t)) for t in TEXTS]
    assert (back.bos_token, back.eos_token) == (tok.bos_token, tok.eos_token)


def test_a_split_llama_cpp_does_not_have_is_refused_naming_the_file(tmp_path):
    # setup: whitespace-split BPE (BERT-style), no llama.cpp tokenizer runs it
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["one two three"] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIALS),
                                                                        show_progress=False))
    model = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64))
    # execute
    with pytest.raises(EdgesmithError, match=r"^tokenizer.json: byte-level BPE with pre_tokenizer .*Whitespace.*"
                                             r"allowed: gpt-2, llama-bpe, qwen2, smollm") as e:
        write_gguf(tmp_path / "x.gguf", model, Tokenizer(tok), "fp32", 64)
    # assert
    assert "\n" not in str(e.value)
