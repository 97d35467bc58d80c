"""Crashes found by scripts/fuzz_readers.py, each reduced to a file built from the suite's own artifacts.

Each case is a corruption the fuzzer reached where a reader let something other than a one-line
EdgesmithError escape (a traceback, or ExecuTorch aborting the process). The format's own structure is
edited (the program's instruction list, the ONNX graph's input shapes, a manifest field), so the case does
not depend on byte offsets of one model. Cases that can take the process down run in a subprocess. A case
marked xfail(strict, raises=...) fails today with the exception named (any other failure, such as a broken
setup, is reported as a failure); when the reader is fixed its mark must go (strict makes the fix visible).
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import runtimes
from devices.profiles import PROFILE_DIR, load_profile
from models.checkpoint import load_checkpoint
from models.errors import EdgesmithError
from toolchain.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
LOAD_AND_RUN = """
import sys
import runtimes
from models.errors import EdgesmithError
try:
    session = runtimes.load(sys.argv[1])
    session.prefill([session.tokenizer.bos_id, 5, 6])
except EdgesmithError as e:
    print(e)
    sys.exit(2)
"""


def copy_with(src: Path, dst: Path, name: str, data: bytes) -> Path:
    """A copy of the artifact `src` with its file `name` replaced by `data`, recorded in its manifest (so the
    reader parses the bytes instead of refusing them at the sha256 check)."""
    shutil.copytree(src, dst)
    (dst / name).write_bytes(data)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def load_in_subprocess(directory: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # ggml's abort would attach gdb for a backtrace: slow
    return subprocess.run([sys.executable, "-c", LOAD_AND_RUN, str(directory)], capture_output=True, text=True,
                          timeout=300, cwd=ROOT, env=env)


def assert_refused_in_one_line(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout


class _Fixed(tuple):
    """No mark (an empty tuple of marks for pytest.param, a no-op as a decorator): the finding is fixed."""

    def __call__(self, fn):
        return fn


FIXED = _Fixed()


def xfail(raises, reason: str):
    """Findings fixed in the product since they were found: the test stands as a regression case."""
    return FIXED


def still_open(raises, reason: str):
    """A finding not fixed yet: it fails today with `raises`, strictly (a fix makes it pass, and fail here)."""
    return pytest.mark.xfail(strict=True, raises=raises, reason=reason)


def one_line(e: EdgesmithError) -> str:
    assert "\n" not in str(e), str(e)
    return str(e)


# ----------------------------------------------------------------------------- device profile TOML

PROFILE_CASES = [  # (bytes replaced in pixel-8.toml, replacement, the exception that escapes today)
    pytest.param(b"Pixel", b"Pi\xffel", UnicodeDecodeError, id="not-utf8"),
    pytest.param(b"ram_budget_fraction = 0.5", b'ram_budget_fraction = "x"', ValueError, id="fraction-a-string"),
    pytest.param(b"ram_gib = 8", b"ram_gib = inf", OverflowError, id="ram-infinite"),
    pytest.param(b'transport = "adb://pixel-8"', b"transport = 1", AttributeError, id="transport-an-int"),
]


@pytest.mark.parametrize("old, new, escapes", [
    pytest.param(*case.values, marks=xfail(case.values[2], "devices/profiles.py profile_from_toml / DeviceProfile: "
                                           "read_text(), float(), int(inf) and str methods on values of the wrong "
                                           "type escape (fuzz: profile-*-crash, a third of all profile cases)"),
                 id=case.id) for case in PROFILE_CASES])
def test_a_profile_with_a_bad_value_is_refused(tmp_path, old, new, escapes):
    # setup: a bundled profile with one value replaced
    text = (PROFILE_DIR / "pixel-8.toml").read_bytes()
    assert old in text
    path = tmp_path / "bad.toml"
    path.write_bytes(text.replace(old, new, 1))
    # execute
    with pytest.raises(EdgesmithError) as e:
        load_profile(str(path))
    # assert
    assert str(path) in one_line(e.value)


@xfail(OSError, "devices/profiles.py load_profile: Path.is_file() raises OSError 'File name too long' for a long "
                "device name (fuzz: recipe-*-crash, a recipe's target.device)")
@pytest.mark.parametrize("name", ["x" * 300, "x" * 300 + ".toml"])
def test_a_device_name_too_long_for_a_path_is_refused(tmp_path, name):
    # setup: a recipe naming it, as the fuzzer's did
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "r"\n[source]\ncheckpoint = "c"\n[target]\ndevice = "{name}"\n')
    # execute
    with pytest.raises(EdgesmithError) as e:
        load_recipe(recipe)
    # assert
    assert "device" in one_line(e.value)


# ----------------------------------------------------------------------------- config.json and the safetensors header


def checkpoint_with(tmp_path: Path, src: Path, **fields) -> Path:
    ckpt = shutil.copytree(src, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, **fields}))
    return ckpt


@xfail(RuntimeError, "models/checkpoint.py build_model: config.json's sizes are not checked against the "
                     "safetensors header before Transformer(config) allocates (fuzz: config-*-crash, "
                     "'DefaultCPUAllocator: can't allocate memory'; a smaller lie allocates for real)")
def test_a_config_far_larger_than_its_tensors_is_refused_before_allocating(tmp_path, checkpoints):
    # setup: the trained tiny checkpoint whose config.json claims 2^32 tokens (1 TB of embedding to allocate)
    ckpt = checkpoint_with(tmp_path, checkpoints["float"], vocab_size=2**32)
    # execute
    with pytest.raises(EdgesmithError) as e:
        load_checkpoint(ckpt)
    # assert
    assert "config.json" in one_line(e.value) or "model.safetensors" in str(e.value)


UNCHECKED = "models/checkpoint.py from_hf_config / models/llama.py: config.json values of the wrong type or size " \
            "reach float(), arithmetic or torch (fuzz: config-*-crash)"
CONFIG_CASES = [
    pytest.param({"num_attention_heads": None}, TypeError, id="heads-null"),
    pytest.param({"rope_theta": [1.0]}, TypeError, id="rope-theta-a-list"),
    pytest.param({"rms_norm_eps": "x"}, ValueError, id="norm-eps-a-string"),
    pytest.param({"max_position_embeddings": 2**63 - 1}, RuntimeError, id="positions-2^63"),
]


@pytest.mark.parametrize("fields, escapes", [pytest.param(*c.values, marks=xfail(c.values[1], UNCHECKED), id=c.id)
                                             for c in CONFIG_CASES])
def test_a_config_field_of_the_wrong_type_or_size_is_refused(tmp_path, checkpoints, fields, escapes):
    # setup
    ckpt = checkpoint_with(tmp_path, checkpoints["float"], **fields)
    # execute
    with pytest.raises(EdgesmithError) as e:
        load_checkpoint(ckpt)
    # assert
    assert "config.json" in one_line(e.value)


@xfail(TypeError, "models/checkpoint.py from_hf_config: a null rope_theta / rms_norm_eps passed the type check (None "
                  "is 'not given') and reached float(None) (fuzz 2026-12-04 session 7: config-*-crash, 18 cases)")
@pytest.mark.parametrize("field", ["rope_theta", "rms_norm_eps", "max_position_embeddings"])
def test_a_null_config_field_means_its_default_as_in_transformers(tmp_path, checkpoints, field):
    # setup
    ckpt = checkpoint_with(tmp_path, checkpoints["float"], **{field: None})
    # execute
    config = load_checkpoint(ckpt).config
    # assert: transformers' defaults for a null field
    assert {"rope_theta": config.rope_theta, "rms_norm_eps": config.norm_eps,
            "max_position_embeddings": config.max_seq_len}[field] == {"rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                                                                      "max_position_embeddings": 2048}[field]


@xfail(subprocess.TimeoutExpired, "models/llama.py _divisors(n) loops over 1..n for the message: "
                                  "num_attention_heads 2^31-1 (head_dim set, as our config.json has it) takes 90 s "
                                  "to refuse (fuzz: config-*-hang, 'no answer in 10 s')")
def test_a_huge_head_count_is_refused_at_once(tmp_path, checkpoints):
    # setup: 2^31 - 4 heads (x head_dim a multiple of 32, as the override check wants) over 3 kv heads
    ckpt = checkpoint_with(tmp_path, checkpoints["float"], num_attention_heads=2**31 - 4, num_key_value_heads=3)
    code = "import sys\nfrom models.checkpoint import load_checkpoint\nload_checkpoint(sys.argv[1])"
    # execute: 20 s covers the imports many times over
    proc = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=20,
                          cwd=ROOT)
    # assert
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("models.errors.EdgesmithError")


@xfail(TypeError, "models/headers.py _tensor: 'dtype not in DTYPE_BITS' with an unhashable dtype (a list) "
                  "raises TypeError (fuzz: safetensors-*-crash)")
@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_a_safetensors_dtype_that_is_not_a_string_is_refused(tmp_path, checkpoints, dtype):
    # setup: the header's first tensor with that dtype, the weights' sha256 recorded again
    ckpt = shutil.copytree(checkpoints["float"], tmp_path / "ckpt")
    raw = (ckpt / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["dtype"] = dtype
    text = json.dumps(header).encode()
    data = struct.pack("<Q", len(text)) + text + raw[8 + n:]
    (ckpt / "model.safetensors").write_bytes(data)
    meta = json.loads((ckpt / "edgesmith.json").read_text())
    meta["files"]["model.safetensors"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ckpt / "edgesmith.json").write_text(json.dumps(meta))
    # execute
    with pytest.raises(EdgesmithError) as e:
        load_checkpoint(ckpt)
    # assert
    assert "model.safetensors" in one_line(e.value)


# ----------------------------------------------------------------------------- manifest.json

NOT_A_TABLE = "runtimes: manifest 'options' is subscripted without a type check (llamacpp.py __init__; fuzz: " \
              "manifest-*-crash)"
MANIFEST_CASES = [
    pytest.param("gguf", ("options",), None, marks=xfail(TypeError, NOT_A_TABLE), id="gguf-options-null"),
    pytest.param("gguf", ("options",), [], marks=xfail(TypeError, NOT_A_TABLE), id="gguf-options-list"),
    pytest.param("gguf", ("options",), 0, marks=xfail(TypeError, NOT_A_TABLE), id="gguf-options-int"),
    pytest.param("gguf", ("options",), KeyError, marks=xfail(KeyError, NOT_A_TABLE), id="gguf-no-options"),
    pytest.param("onnx", ("options", "graph"), KeyError, id="onnx-no-graph", marks=xfail(
        KeyError, "runtimes/backends/onnxruntime.py __init__: opts['graph'] (KeyError; fuzz: manifest-*-crash)")),
    pytest.param("gguf", ("model", "vocab_size"), "x", id="gguf-vocab-a-string", marks=xfail(
        ValueError, "runtimes/loader.py artifact_tokenizer: int(model.vocab_size) (fuzz: manifest-*-crash)")),
    pytest.param("executorch", ("model", "vocab_size"), KeyError, id="pte-no-vocab", marks=xfail(
        KeyError, "runtimes/backends/executorch.py __init__: manifest['model']['vocab_size'] (fuzz: "
                  "manifest-*-crash)")),
    pytest.param("executorch", ("options",), [], id="pte-options-list", marks=xfail(
        AttributeError, "runtimes/backends/executorch.py __init__: manifest['options'].get (fuzz: manifest-*-crash)")),
    pytest.param("gguf", ("precision",), KeyError, id="gguf-no-precision", marks=xfail(
        KeyError, "runtimes/backends/llamacpp.py __init__: manifest['precision'] for the KV cache type; check_fields "
                  "defaulted a missing one (fuzz 2026-12-04 session 7: manifest-*-crash)")),
    pytest.param("onnx-plain", ("precision",), KeyError, id="onnx-no-precision", marks=xfail(
        KeyError, "runtimes/backends/onnxruntime.py __init__: manifest['precision'] for the cache dtype (fuzz "
                  "2026-12-04 session 7: manifest-*-crash)")),
    pytest.param("onnx", ("options", "max_seq_len"), 2**32, id="onnx-max-seq-len-2^32", marks=xfail(
        MemoryError, "runtimes/backends/onnxruntime.py _bind_fused_cache: the manifest's max_seq_len sizes the KV "
                     "cache unchecked (2^32 positions: 1 TiB; MemoryError; fuzz: manifest-*-crash). A smaller lie "
                     "allocates for real")),
]


@pytest.mark.parametrize("fmt, where, value", MANIFEST_CASES)
def test_a_manifest_with_a_field_of_the_wrong_kind_is_refused(tmp_path, artifact, fmt, where, value):
    # setup: the manifest's field at `where` set to `value` (KeyError: removed)
    d = shutil.copytree(artifact(fmt), tmp_path / fmt)
    manifest = json.loads((d / "manifest.json").read_text())
    table = manifest
    for key in where[:-1]:
        table = table[key]
    if value is KeyError:
        del table[where[-1]]
    else:
        table[where[-1]] = value
    (d / "manifest.json").write_text(json.dumps(manifest))
    # execute
    with pytest.raises(EdgesmithError) as e:
        runtimes.load(d)
    # assert
    assert "manifest.json" in one_line(e.value)


# ----------------------------------------------------------------------------- GGUF


def token_cut_by_nul(path: Path) -> bytes:
    """The GGUF at `path` with a NUL written, in place, as the second byte of its first ASCII token that is two or
    more bytes long and whose first byte is a token too: distinct to Python, a duplicate of that one-byte token to
    llama.cpp, which reads token texts as C strings."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"]
    tokens = [bytes(field.parts[i]) for i in field.data]
    token = next(t for t in tokens if len(t) >= 2 and t.isascii() and t[:1] in set(tokens))
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(token)) + token) + 8 + 1
    data[at] = 0
    return bytes(data)


@xfail(AssertionError, "runtimes/backends/llamacpp.py check_gguf compares token texts as bytes; llama.cpp reads "
                       "them as C strings, so a token cut by a NUL duplicates another and llama-vocab.cpp aborts: "
                       "GGML_ASSERT(id_to_token.size() == token_to_id.size()), SIGABRT (fuzz: gguf-*-crash)")
def test_a_gguf_token_cut_short_by_a_nul_is_refused(tmp_path, artifact):
    # setup
    src = artifact("gguf")
    d = copy_with(src, tmp_path / "gguf", "model.gguf", token_cut_by_nul(src / "model.gguf"))
    # execute
    proc = load_in_subprocess(d)
    # assert: refused in one line, not aborted by GGML_ASSERT
    assert_refused_in_one_line(proc)


# ----------------------------------------------------------------------------- ONNX


@xfail(AssertionError, "runtimes/backends/onnxruntime.py: the graph's cache inputs are not checked against the "
                       "manifest's model at load: shapes from the graph size numpy arrays in __init__ (ValueError "
                       "'array is too big', TypeError for a symbolic dim, MemoryError for the fused cache) and ONNX "
                       "Runtime's errors at run time escape (RuntimeError, InvalidArgument; fuzz: onnx-*-crash)")
@pytest.mark.parametrize("name, dim, value", [("onnx", 0, 2**32), ("onnx-plain", 0, 2**32), ("onnx", 1, 2**62),
                                              ("onnx", 3, "x"), ("onnx", 1, 2**32)])
def test_an_onnx_graph_whose_cache_inputs_were_edited_is_refused(tmp_path, artifact, name, dim, value):
    import onnx

    # setup: the graph with one dim of every past_key_values input set to `value` (a str: a symbolic dim)
    src = artifact(name)
    model = onnx.load(str(src / "model.onnx"))
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            d = inp.type.tensor_type.shape.dim[dim]
            if isinstance(value, str):
                d.dim_param = value
            else:
                d.dim_value = value
    d = copy_with(src, tmp_path / name, "model.onnx", model.SerializeToString())
    # execute
    proc = load_in_subprocess(d)
    # assert
    assert_refused_in_one_line(proc)


@xfail(AssertionError, "runtimes/backends/onnxruntime.py: the manifest's options.graph is trusted; a fused graph "
                       "in a 'plain' artifact fails in session.run with ValueError (fuzz: onnx-*-crash)")
def test_an_onnx_graph_of_the_other_kind_than_its_manifest_says_is_refused(tmp_path, artifact):
    # setup: the plain artifact holding the fused graph
    fused = (artifact("onnx") / "model.onnx").read_bytes()
    d = copy_with(artifact("onnx-plain"), tmp_path / "plain", "model.onnx", fused)
    # execute
    proc = load_in_subprocess(d)
    # assert
    assert_refused_in_one_line(proc)


# ----------------------------------------------------------------------------- ExecuTorch .pte


def edited_program(src: Path, edit) -> bytes:
    """The .pte of `src` with `edit(execution_plan)` applied to its deserialized program."""
    from executorch.exir._serialize._program import deserialize_pte_binary, serialize_pte_binary

    pte = deserialize_pte_binary((src / "model.pte").read_bytes())
    edit(pte.program.execution_plan[0])
    return bytes(serialize_pte_binary(pte, extract_delegate_segments=True))


def non_tensor_argument(plan) -> None:
    """The first kernel call whose first argument is a tensor gets an Int value there instead."""
    from executorch.exir.schema import Int, KernelCall, Tensor

    an_int = next(i for i, v in enumerate(plan.values) if isinstance(v.val, Int))
    call = next(ins.instr_args for chain in plan.chains for ins in chain.instructions
                if isinstance(ins.instr_args, KernelCall) and ins.instr_args.args
                and isinstance(plan.values[ins.instr_args.args[0]].val, Tensor))
    call.args[0] = an_int


def delegate_call_missing_an_argument(plan) -> None:
    """The first delegate call loses its last argument (a bit flip in the args vector's length)."""
    from executorch.exir.schema import DelegateCall

    call = next(ins.instr_args for chain in plan.chains for ins in chain.instructions
                if isinstance(ins.instr_args, DelegateCall) and len(ins.instr_args.args) > 1)
    call.args.pop()


def scalar_argument_as_tensor(plan) -> None:
    """The first `aten::add.out` call gets a tensor where it takes its Scalar (`alpha`, the third argument)."""
    from executorch.exir.schema import KernelCall, Tensor

    a_tensor = next(i for i, v in enumerate(plan.values) if isinstance(v.val, Tensor))
    add = {i for i, op in enumerate(plan.operators) if (op.name, op.overload) == ("aten::add", "out")}
    call = next(ins.instr_args for chain in plan.chains for ins in chain.instructions
                if isinstance(ins.instr_args, KernelCall) and ins.instr_args.op_index in add)
    call.args[2] = a_tensor


def xnnpack_identifier_not_utf8(data: bytes) -> bytes:
    """The first XNNPACK delegate's flatbuffer identifier (`XN01`) as four bytes that are not UTF-8."""
    data = bytearray(data)
    at = data.index(b"XH00")  # XNNHeader: 4 bytes, magic, u16 header size, u32 flatbuffer offset, ...
    start, (fb_offset,) = at - 4, struct.unpack_from("<I", data, at + 6)
    assert data[start + fb_offset + 4:start + fb_offset + 8] in (b"XN00", b"XN01")
    data[start + fb_offset + 4:start + fb_offset + 8] = b"\xff\xfe\xfd\xfc"
    return bytes(data)


ABORTS = "ExecuTorch aborts the process (SIGABRT) on a kernel argument of the wrong type (evalue.h toTensor / " \
         "toScalar: 'EValue is not a ...'); the backend does not check arguments against the operators' schemas " \
         "before loading (fuzz: pte-*-crash, 'worker killed by SIGABRT')"


@xfail(AssertionError, ABORTS)
@pytest.mark.parametrize("edit", [non_tensor_argument, scalar_argument_as_tensor], ids=["to-tensor", "to-scalar"])
def test_a_program_passing_a_value_of_the_wrong_type_to_a_kernel_is_refused(tmp_path, artifact, edit):
    # setup
    src = artifact("executorch")
    d = copy_with(src, tmp_path / "pte", "model.pte", edited_program(src, edit))
    # execute
    proc = load_in_subprocess(d)
    # assert: refused in one line, not killed by SIGABRT
    assert_refused_in_one_line(proc)


@xfail(AssertionError, "ExecuTorch's XNNPACK compiler logs the bad identifier ('%.4s' != expected XN00 or XN01) "
                       "through pybind11, which cannot decode it: error_already_set in a noexcept path, "
                       "std::terminate, SIGABRT (fuzz: pte-*-crash, 'worker killed by SIGABRT' with nothing on "
                       "stderr: captured() holds it)")
def test_a_program_whose_xnnpack_blob_identifier_is_not_utf8_is_refused(tmp_path, artifact):
    # setup
    src = artifact("executorch")
    d = copy_with(src, tmp_path / "pte", "model.pte", xnnpack_identifier_not_utf8((src / "model.pte").read_bytes()))
    # execute
    proc = load_in_subprocess(d)
    # assert
    assert_refused_in_one_line(proc)


def operator_index_out_of_range(plan) -> None:
    """The first kernel call names operator 2^28 + its own (a bit flip in op_index)."""
    from executorch.exir.schema import KernelCall

    call = next(ins.instr_args for chain in plan.chains for ins in chain.instructions
                if isinstance(ins.instr_args, KernelCall))
    call.op_index += 1 << 28


def method_renamed(plan) -> None:
    plan.name = "forwarD"


@xfail(AssertionError, "ExecuTorch logs '[method.cpp] Op index ... out of range' at load and goes on; execute "
                       "then dies with SIGSEGV (fuzz: pte-*-crash, 'worker killed by SIGSEGV')")
def test_a_program_whose_kernel_call_names_an_operator_out_of_range_is_refused(tmp_path, artifact):
    # setup
    src = artifact("executorch")
    d = copy_with(src, tmp_path / "pte", "model.pte", edited_program(src, operator_index_out_of_range))
    # execute
    proc = load_in_subprocess(d)
    # assert: refused in one line, not killed by SIGSEGV
    assert_refused_in_one_line(proc)


@xfail(AssertionError, "runtimes/backends/executorch.py __init__: the manifest's method ('forward') is not looked "
                       "up in the program's method names; executorch.runtime's load_method raises KeyError (fuzz: "
                       "pte-*-crash)")
def test_a_program_without_the_method_its_manifest_names_is_refused(tmp_path, artifact):
    # setup
    src = artifact("executorch")
    d = copy_with(src, tmp_path / "pte", "model.pte", edited_program(src, method_renamed))
    # execute
    proc = load_in_subprocess(d)
    # assert
    assert_refused_in_one_line(proc)


@xfail(AssertionError, "ExecuTorch executes a delegate call that lacks an argument: 'method->execute() failed "
                       "with error 0x12' on some runs, SIGSEGV inside ExecuTorch on others (fuzz: pte-*-crash)")
def test_a_program_whose_delegate_call_lacks_an_argument_is_refused(tmp_path, artifact):
    # setup
    src = artifact("executorch")
    d = copy_with(src, tmp_path / "pte", "model.pte", edited_program(src, delegate_call_missing_an_argument))
    # execute
    proc = load_in_subprocess(d)
    # assert
    assert_refused_in_one_line(proc)
