"""Our GGUF export against llama.cpp's own converter (issue 21's families): convert_hf_to_gguf.py from the
llama-cpp-python 0.3.36 sdist, run on the same fitted Hugging Face directory (our checkpoint is one), writes what
we write. Per family (Llama untied, SmolLM tied, Mistral, Qwen2, Qwen3, Phi-3, Gemma-2, Gemma-3), at fp32: the same architecture;
the same tensors, bit for bit (names, shapes, F32, values: our RoPE row permutation and Phi-3's fused q/k/v and
gate/up are theirs); every `{arch}.` and `tokenizer.ggml.` key they write, with their value (a key we leave out is
listed in DEFAULTED with the value llama.cpp's loader falls back to, and that value must be theirs); and, when
llama.cpp runs either file, the same prompt logits (bit for bit) and the same 16 greedy tokens."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

import runtimes
from models.checkpoint import child_lineage, load_checkpoint, save_checkpoint
from models.hf import import_hf
from tests.conftest import TEXT
from tests.models.test_families import hf_model
from tests.toolchain.export.conftest import fit
from toolchain.export import ExportConfig, export
from toolchain.export.parity import PARITY_TEXT, torch_threads

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")

VERSION = "0.3.36"
CACHE = Path.home() / ".cache" / "edgesmith" / "llama-cpp-src"
SDIST_ROOT = f"llama_cpp_python-{VERSION}"
TREE = CACHE / SDIST_ROOT / "vendor" / "llama.cpp"
NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # what the converter imports, under vendor/llama.cpp
DOWNLOAD = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={VERSION}", "-d", str(CACHE)]

# family -> (tests/models/test_families.py FAMILIES key, config overrides); "llama" is the Llama with its own head
FAMILIES = {"llama": ("smollm", {"tie_word_embeddings": False}), "smollm": ("smollm", {}), "mistral": ("mistral", {}),
            "qwen2": ("qwen2", {}), "qwen3": ("qwen3", {}), "phi3": ("phi3", {}),
            # Their converter writes neither Gemma-2's rope.freq_base nor Gemma-3's layer pattern or local base:
            # llama.cpp then assumes the published Gemma values (base 10000; every 6th layer full; local base 10000).
            # Compared at those. Ours writes all three: off those values llama.cpp runs ours within 3e-3 of
            # transformers' logits and theirs 4.4 off (Gemma-2 with the test families' base 1e6) and 1.7 off
            # (Gemma-3 with layer 1 of 2 full).
            "gemma2": ("gemma2", {"rope_theta": 10000.0}),
            "gemma3": ("gemma3", {"rope_local_base_freq": 10000.0, "layer_types": ["sliding_attention"] * 2})}

# Keys their converter writes and our writer leaves out, where llama.cpp's loader falls back to the value they write:
# key without the "{arch}." prefix -> (that fallback, computed from our file's fields; why we leave it out)
DEFAULTED = {
    "attention.key_length": (lambda f, arch: f[f"{arch}.embedding_length"] // f[f"{arch}.attention.head_count"],
                             "written only for a head-pruned model; llama.cpp defaults it to n_embd / n_head"),
    "attention.value_length": (lambda f, arch: f[f"{arch}.embedding_length"] // f[f"{arch}.attention.head_count"],
                               "written only for a head-pruned model; llama.cpp defaults it to n_embd / n_head"),
    "tokenizer.ggml.add_eos_token": (lambda f, arch: False,
                                     "llama.cpp's BPE vocab (tokenizer.ggml.model gpt2) defaults add_eos to false"),
}

# Run in a subprocess as `python convert.py HF_DIR --outfile X --outtype f32`: their converter, two patches.
WRAPPER = '''\
import os
import sys
from pathlib import Path

import convert_hf_to_gguf  # puts its own gguf-py first on sys.path, unless NO_LOCAL_GGUF is set
import gguf
from conversion.base import TextModel
from conversion.gemma import Gemma2Model
from conversion.phi import Phi3MiniModel

# Its own gguf-py (0.19.0 too, but newer than PyPI's gguf 0.19.0, whose MODEL_ARCH lacks DFLASH that it registers).
assert Path(gguf.__file__).is_relative_to(Path(convert_hf_to_gguf.__file__).parent / "gguf-py"), gguf.__file__
# Our tokenizer is a tiny byte-level BPE trained by the tests: the hash of its tokens for the converter's check text
# is in no table (get_vocab_base_pre raises). Name the pre-tokenizer we write, GPT-2's byte-level regex.
# (test_our_tokenizer_keys_... names the family's split, whose hash would be in their table for the real tokenizer.)
TextModel.get_vocab_base_pre = lambda self, tokenizer: os.environ.get("EDGESMITH_PRE", "gpt-2")
# Phi-3's converter reads a SentencePiece tokenizer.model unless tokenizer_config.json names GPT2Tokenizer (Phi-4);
# ours names PreTrainedTokenizerFast and is byte-level BPE: take the converter's own BPE path, as for Phi-4.
Phi3MiniModel.set_vocab = TextModel._set_vocab_gpt2
# Gemma-2's likewise (Gemma-3's takes the BPE path itself when there is no tokenizer.model).
Gemma2Model.set_vocab = TextModel._set_vocab_gpt2
sys.argv[0] = convert_hf_to_gguf.__file__
convert_hf_to_gguf.main()
'''


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, holding only what convert_hf_to_gguf.py needs (cached)."""
    if (TREE / "convert_hf_to_gguf.py").is_file():
        return TREE
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"{SDIST_ROOT}.tar.gz"
    if not sdist.is_file():
        try:
            done = subprocess.run(DOWNLOAD, capture_output=True, text=True, timeout=300)
            ok = done.returncode == 0 and sdist.is_file()
            failure = None if ok else (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        except subprocess.TimeoutExpired:
            failure = "timed out after 300 s"
        if failure:
            pytest.skip(f"llama.cpp's converter: `{' '.join(DOWNLOAD)}` failed (no network?): {failure}")
    prefixes = tuple(f"{SDIST_ROOT}/vendor/llama.cpp/{name}" for name in NEEDED)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".extract-"))  # renamed into place whole, or removed
    try:
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, members=[m for m in tar if m.name.startswith(prefixes)], filter="data")
        try:
            (tmp / SDIST_ROOT).rename(CACHE / SDIST_ROOT)
        except OSError:  # another run put it there first
            if not (TREE / "convert_hf_to_gguf.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TREE


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer, llama_cpp_converter):
    """family -> (our fitted checkpoint, our fp32 export directory, their fp32 .gguf of that checkpoint)."""
    root = tmp_path_factory.mktemp("llama-cpp-converter")
    (root / "convert.py").write_text(WRAPPER)
    tokens = np.array(tokenizer.encode(TEXT + PARITY_TEXT * 20), dtype=np.uint16)
    paths = [str(llama_cpp_converter), str(llama_cpp_converter / "gguf-py"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "HF_HUB_OFFLINE": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    made = {}

    def get(family: str):
        if family in made:
            return made[family]
        key, overrides = FAMILIES[family]
        src = root / f"hf-{family}"
        hf_model(key, **overrides).save_pretrained(src)
        tokenizer.save(src)
        ckpt = load_checkpoint(import_hf(src, root / f"imported-{family}"))
        with torch_threads(1):
            fit(ckpt.model, tokens, steps=150)  # 150 steps: greedy text that is not one token repeated
        ckpt = save_checkpoint(ckpt.model, tokenizer, root / family, child_lineage(ckpt, {"kind": "test-fit"}))
        with torch_threads(1):
            export(ckpt, root / f"ours-{family}", ExportConfig(format="gguf", precision="fp32"), log=lambda line: None)
        theirs = root / f"theirs-{family}.gguf"
        # --model-name: general.name is what we write. By default the converter names the model after its
        # directory ("phi3"), and llama.cpp then gives "</s>" of a Phi-3 vocab an attribute: our vocab has no "</s>"
        # and the load fails (unordered_map::at).
        done = subprocess.run([sys.executable, str(root / "convert.py"), str(ckpt), "--outfile", str(theirs),
                               "--outtype", "f32", "--model-name", "edgesmith"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        made[family] = ckpt, root / f"ours-{family}", theirs
        return made[family]

    return get


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def llama_cpp_greedy(path: Path, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """The prompt's logits and the greedy tokens after it, from a bare .gguf through llama-cpp-python, set up as our
    backend runs an fp32 artifact (an F32 KV cache, no flash attention, one thread)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, logits_all=True,
                          flash_attn=False, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          verbose=False)
    try:
        llm.eval(prompt)
        logits, out = np.array(llm.scores[:len(prompt)]), []
        for _ in range(steps):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return logits, out
    finally:
        llm.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_gguf_holds_the_tensors_llama_cpps_converter_writes_bit_for_bit(converted, family):
    # setup
    _, ours_dir, theirs_path = converted(family)
    # execute
    ours, theirs = gguf.GGUFReader(str(ours_dir / "model.gguf")), gguf.GGUFReader(str(theirs_path))
    a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    # assert: the architecture, then each tensor's shape, type and bytes
    assert fields(ours)["general.architecture"] == fields(theirs)["general.architecture"]
    assert sorted(a) == sorted(b)
    for name in b:
        assert (list(a[name].shape), a[name].tensor_type.name) == (list(b[name].shape), b[name].tensor_type.name), name
        assert a[name].tensor_type == gguf.GGMLQuantizationType.F32, name
        diff = np.abs(np.asarray(a[name].data, np.float64) - np.asarray(b[name].data, np.float64)).max()
        assert a[name].data.tobytes() == b[name].data.tobytes(), f"{name}: max abs diff {diff}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_our_gguf_has_every_llama_cpp_key_their_converter_writes_with_its_value(converted, family):
    # setup
    _, ours_dir, theirs_path = converted(family)
    # execute
    ours, theirs = fields(gguf.GGUFReader(str(ours_dir / "model.gguf"))), fields(gguf.GGUFReader(str(theirs_path)))
    arch = theirs["general.architecture"]
    read = [k for k in theirs if k.startswith((f"{arch}.", "tokenizer.ggml."))]
    # assert: each key with their value; a key we leave out falls back in llama.cpp to exactly their value
    assert len(read) > 15
    for key in read:
        short = key.removeprefix(f"{arch}.")
        if key not in ours and short in DEFAULTED:
            assert DEFAULTED[short][0](ours, arch) == theirs[key], key
        else:
            assert ours.get(key, "<missing>") == theirs[key], key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_runs_our_gguf_and_theirs_to_the_same_logits_and_greedy_text(converted, family):
    # setup
    _, ours_dir, theirs_path = converted(family)
    session = runtimes.load(ours_dir)
    prompt = [session.tokenizer.bos_id, *session.tokenizer.encode(PARITY_TEXT[:40])]
    # execute
    logits = session.prefill(prompt)
    got = list(session.generate(prompt, runtimes.GenerationConfig(max_new_tokens=16)))
    their_logits, want = llama_cpp_greedy(theirs_path, prompt, 16)
    # assert: the prompt's logits, then 16 greedy tokens (not one token repeated: a test, not a formality)
    assert np.abs(logits - their_logits).max() == 0
    assert len(want) == 16 and len(set(want)) > 2, want
    assert got == want


@pytest.mark.parametrize("kind", ["llama-bpe", "qwen2", "smollm", "spm-legacy"])
def test_our_tokenizer_keys_are_what_llama_cpps_converter_writes_for_the_family(tmp_path, llama_cpp_converter, kind):
    """Llama-3's, Qwen2's and SmolLM's byte-level tokenizers and a Llama-2 / Mistral SentencePiece one (built as in
    tests/toolchain/test_gguf_vocab.py), each in a tiny Hugging Face Llama directory: their converter and ours."""
    # setup
    from models.tokenizer import Tokenizer
    from tests.toolchain.test_gguf_vocab import BYTE_LEVEL, TEXTS, byte_level, sentencepiece
    from toolchain.export.formats.gguf import write_gguf

    src = tmp_path / "hf"
    src.mkdir()
    (byte_level if kind in BYTE_LEVEL else sentencepiece)(kind, src)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("add_prefix_space", None)  # else transformers rebuilds the fast tokenizer from a tokenizer.model
    (src / "tokenizer_config.json").write_text(json.dumps(config))  # (the prefix is in tokenizer.json's normalizer)
    tok = Tokenizer.load(src)
    hf_model("smollm", vocab_size=tok.vocab_size, tie_word_embeddings=False, bos_token_id=tok.bos_id,
             eos_token_id=tok.eos_id).save_pretrained(src)
    (tmp_path / "convert.py").write_text(WRAPPER)
    paths = [str(llama_cpp_converter), str(llama_cpp_converter / "gguf-py"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "HF_HUB_OFFLINE": "1",
           "EDGESMITH_PRE": kind}
    env.pop("NO_LOCAL_GGUF", None)
    # execute
    done = subprocess.run([sys.executable, str(tmp_path / "convert.py"), str(src), "--outfile",
                           str(tmp_path / "theirs.gguf"), "--outtype", "f32"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = load_checkpoint(import_hf(src, tmp_path / "ckpt"))
    write_gguf(tmp_path / "ours.gguf", ckpt.model, ckpt.tokenizer, "fp32", 64)
    ours, theirs = (fields(gguf.GGUFReader(str(tmp_path / f"{w}.gguf"))) for w in ("ours", "theirs"))
    # assert: the same tokenizer, key by key
    same = ["tokenizer.ggml.model", "tokenizer.ggml.tokens"]
    if kind in BYTE_LEVEL:
        same += ["tokenizer.ggml.pre", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"]
    for key in same:
        assert ours[key] == theirs[key], key
    if kind not in BYTE_LEVEL:  # SentencePiece: the types but <unk> (theirs CONTROL, ours UNKNOWN, as
        # llama.cpp's own SentencePiece path writes it); the scores are where theirs and ours differ by design
        unk = tok.tok.token_to_id("<unk>")
        assert [t for i, t in enumerate(ours["tokenizer.ggml.token_type"]) if i != unk] == \
            [t for i, t in enumerate(theirs["tokenizer.ggml.token_type"]) if i != unk]
        assert set(theirs["tokenizer.ggml.scores"]) == {-1000.0} and len(set(ours["tokenizer.ggml.scores"])) > 100
        # with every score equal, llama.cpp merges the leftmost pair whatever its rank: their file splits
        # texts differently from the tokenizer (3 of the 11 here); ours as it does
        split = {w: llama_cpp.Llama(str(tmp_path / f"{w}.gguf"), vocab_only=True, verbose=False)
                 for w in ("ours", "theirs")}
        want = [tok.encode(t) for t in TEXTS]
        got = {w: [llm.tokenize(t.encode(), add_bos=False, special=True) for t in TEXTS] for w, llm in split.items()}
        assert got["ours"] == want
        assert sum(a != b for a, b in zip(got["theirs"], want)) > 0
