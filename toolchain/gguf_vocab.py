"""A tokenizer in a GGUF file, both ways: tokenizer.json -> llama.cpp's `tokenizer.ggml.*` keys, and back.

llama.cpp runs two tokenizers for the families we take (src/llama-vocab.cpp), and a file that names the
wrong one still loads, then splits every prompt differently from the model's own tokenizer. So the kind is
read from the structure of tokenizer.json, never assumed:

- `gpt2`: byte-level BPE with ranked merges. `tokenizer.ggml.pre` names the split applied before it, which
  differs by family: `gpt-2` (GPT-2's regex; edgesmith's own tokenizer), `llama-bpe` (Llama-3's regex, digits
  in threes; llama.cpp then also takes a whole word that is a token before merging, HF's `ignore_merges`),
  `qwen2` (Qwen2/2.5/3: Llama-3's regex with single digits; their NFC normalizer llama.cpp skips, which only
  matters for text that is not NFC already), `smollm` (SmolLM: single digits, then GPT-2's regex).
- `llama`: SentencePiece BPE (Llama-2, Mistral, Phi-3, Gemma, as transformers converts them: BPE with byte
  fallback over `▁`-escaped text). llama.cpp merges the adjacent pair whose concatenation has the highest
  score; HF merges the pair of lowest rank. Writing each token's score as minus the rank of the first merge
  that makes it gives both the same order (llama.cpp's own converter writes -1000 for every token of such a
  tokenizer.json, which leaves the order to chance). Reading back, the merges come from the scores, the way
  transformers' SentencePiece converter builds them: every split of a token into two tokens, ranked by score.
  One difference stays: transformers' newer Metaspace form (prepend_scheme "first") does not prefix a space to
  a text (or the text after a special token) that starts with one, and llama.cpp's add_space_prefix always
  does; only such texts split differently.

Anything else (another split, a normalizer llama.cpp does not apply, WordPiece, Unigram) is refused in one line
naming the file and the part, rather than written as a tokenizer that quietly disagrees.
This module knows tokenizers and GGUF keys; it does not write files (the exporter does) or read tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from models.errors import EdgesmithError
from models.tokenizer import BOS, EOT, PAD, Tokenizer

# the regexes as the families' tokenizer.json files spell them (llama.cpp adapts them to its regex engine)
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
SPACE = "▁"  # SentencePiece's escaped space
# gguf.TokenType values (kept here so reading a file needs no gguf import to classify)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def byte_level_split(pre: str):
    """The HF pre-tokenizer that splits as llama.cpp's `pre` does, then maps bytes to GPT-2's alphabet."""
    def level(regex: bool):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex)

    if pre == "gpt-2":
        return level(True)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), level(True)])
    regex = {"llama-bpe": LLAMA3, "qwen2": QWEN2}[pre]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"), level(False)])


PRES = ("gpt-2", "llama-bpe", "qwen2", "smollm")
ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "deepseek-r1-qwen": "qwen2"}  # llama.cpp's other names
IGNORE_MERGES = {"llama-bpe"}  # llama.cpp sets ignore_merges for this split only
NORMALIZER = {"qwen2": normalizers.NFC()}


def _spm_normalizer(space_prefix: bool):
    replace = normalizers.Replace(" ", SPACE)
    return normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if space_prefix else replace


def _json(obj) -> dict | None:
    """A tokenizers component as tokenizer.json spells it, without the offsets-only field."""
    if obj is None:
        return None
    holder = HFTokenizer(models.BPE())
    if isinstance(obj, pre_tokenizers.PreTokenizer):
        holder.pre_tokenizer = obj
        return _strip(json.loads(holder.to_str())["pre_tokenizer"])
    holder.normalizer = obj
    return _strip(json.loads(holder.to_str())["normalizer"])


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k != "trim_offsets"}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


@dataclass
class GGUFVocab:
    """What llama.cpp reads of a tokenizer: its kind, the tokens with types and scores, merges for `gpt2`."""
    model: str                      # "gpt2" | "llama"
    pre: str | None                 # gpt2's split; None for llama
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool | None = None
    unk_id: int | None = None


def _spm_kind(data: dict, where: str) -> bool | None:
    """None when tokenizer.json is not SentencePiece BPE; else whether it prefixes a space to the text."""
    model = data["model"]
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    norm, pre = _strip(data.get("normalizer")), _strip(data.get("pre_tokenizer"))
    steps = norm.get("normalizers") if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    prepend, replace = _json(normalizers.Prepend(SPACE)), _json(normalizers.Replace(" ", SPACE))
    gemma_split = _json(pre_tokenizers.Split(" ", "merged_with_previous"))  # finds no space after the escape
    if steps in ([prepend, replace], [replace]) and pre in (None, gemma_split):
        return steps[0] == prepend  # transformers' "legacy" Llama / Mistral form, or Gemma's
    if not steps and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and not pre.get("split") and pre.get("prepend_scheme") in ("first", "always", "never"):
        return pre["prepend_scheme"] != "never"
    raise EdgesmithError(f"{where}: a byte-fallback BPE (SentencePiece) whose normalizer {norm!r:.80} / "
                         f"pre_tokenizer {pre!r:.80} llama.cpp's 'llama' tokenizer does not reproduce")


def _byte_level_pre(data: dict, where: str) -> str:
    norm, pre = _strip(data.get("normalizer")), _strip(data.get("pre_tokenizer"))
    for name in PRES:
        if pre == _json(byte_level_split(name)) and norm in (None, _json(NORMALIZER.get(name))):
            if bool(data["model"].get("ignore_merges")) != (name in IGNORE_MERGES):
                raise EdgesmithError(f"{where}: ignore_merges={bool(data['model'].get('ignore_merges'))} with the "
                                     f"{name!r} split; llama.cpp's {name!r} has ignore_merges="
                                     f"{name in IGNORE_MERGES}")
            return name
    raise EdgesmithError(f"{where}: byte-level BPE with pre_tokenizer {pre!r:.120} / normalizer {norm!r:.60}: no "
                         f"llama.cpp split matches it; allowed: {', '.join(PRES)} (GPT-2, Llama-3, Qwen2, SmolLM)")


def vocab_for_gguf(tokenizer: Tokenizer, vocab_size: int, where: str = "tokenizer.json") -> GGUFVocab:
    """The GGUF vocabulary of `tokenizer`, padded with unused tokens to `vocab_size`."""
    data = json.loads(tokenizer.tok.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise EdgesmithError(f"{where}: model type {model.get('type')!r} has no llama.cpp tokenizer we write; "
                             "allowed: 'BPE' (byte-level or SentencePiece byte-fallback)")
    space_prefix = _spm_kind(data, where)
    pre = _byte_level_pre(data, where) if space_prefix is None else None
    by_id = {i: t for t, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    added = {a["content"]: a.get("special", False) for a in data.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    first_rank: dict[str, int] = {}  # SentencePiece: the token a merge makes -> the first such merge's rank
    for rank, m in enumerate(merges if space_prefix is not None else ()):
        first_rank.setdefault(m.replace(" ", "", 1), rank)
    unk = model.get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            scores.append(0.0)
            continue
        tokens.append(t)
        if t in added:
            types.append(CONTROL if added[t] else USER_DEFINED)
        elif space_prefix is not None and t == unk:
            types.append(UNKNOWN)
        elif space_prefix is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        scores.append(-float(first_rank[t]) if t in first_rank else 0.0)
    if space_prefix is None:
        return GGUFVocab("gpt2", pre, tokens, types, merges=merges)
    return GGUFVocab("llama", None, tokens, types, scores=scores, add_space_prefix=space_prefix,
                     unk_id=tokenizer.tok.token_to_id(unk) if unk else None)


# ----------------------------------------------------------------------------- back


def tokenizer_from_gguf(vocab: GGUFVocab, bos_id: int | None, eos_id: int | None, where: str) -> Tokenizer:
    """tokenizer.json from a file's vocabulary; refuses, naming `where`, a kind or split we cannot rebuild."""
    keep = [(i, t) for i, (t, k) in enumerate(zip(vocab.tokens, vocab.types)) if k != UNUSED]
    if vocab.model == "gpt2":
        vocab.pre = ALIASES.get(vocab.pre, vocab.pre)
        if vocab.pre not in PRES:
            raise EdgesmithError(f"{where}: tokenizer.ggml.pre {vocab.pre!r:.40} is not supported; allowed: "
                                 f"{', '.join(PRES)} (a missing pre is llama.cpp's 'default' split, which no "
                                 "family's own tokenizer uses)")
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in keep},
                                     merges=[tuple(m.split(" ", 1)) for m in vocab.merges],
                                     ignore_merges=vocab.pre in IGNORE_MERGES))
        if vocab.pre in NORMALIZER:
            tok.normalizer = NORMALIZER[vocab.pre]
        tok.pre_tokenizer = byte_level_split(vocab.pre)
        tok.decoder = decoders.ByteLevel()
    elif vocab.model == "llama":
        if vocab.scores is None:
            raise EdgesmithError(f"{where}: tokenizer.ggml.scores is missing (a SentencePiece vocabulary merges by "
                                 "score)")
        unk = vocab.tokens[vocab.unk_id] if vocab.unk_id is not None else None
        tok = HFTokenizer(models.BPE(vocab={t: i for i, t in keep}, merges=spm_merges(vocab), byte_fallback=True,
                                     fuse_unk=True, unk_token=unk))
        tok.normalizer = _spm_normalizer(bool(vocab.add_space_prefix))
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if vocab.add_space_prefix else []))
    else:
        raise EdgesmithError(f"{where}: tokenizer.ggml.model {vocab.model!r:.40} is not supported; allowed: "
                             "'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(vocab.tokens, vocab.types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(vocab.tokens, vocab.types) if k == USER_DEFINED])
    names = {i: t for i, t in keep}
    bos = names.get(bos_id, BOS if BOS in names.values() else None)
    eos = names.get(eos_id, EOT if EOT in names.values() else None)
    if bos is None or eos is None:
        raise EdgesmithError(f"{where}: tokenizer.ggml.bos_token_id / eos_token_id name no token of the vocabulary")
    return Tokenizer(tok, bos, eos, PAD if PAD in names.values() else None, source=where)


def spm_merges(vocab: GGUFVocab) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, highest score of the result first."""
    ids = {t: i for i, (t, k) in enumerate(zip(vocab.tokens, vocab.types)) if k in (NORMAL, USER_DEFINED)}
    ranked = []
    for t, i in ids.items():
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in ids and b in ids:
                ranked.append((-vocab.scores[i], i, ids[a], ids[b], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]
