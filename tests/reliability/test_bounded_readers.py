"""Hostile headers: every count, length and offset in a GGUF, safetensors, ONNX or .pte header is checked
against the file's size before anything is allocated or followed (models.headers, runtimes.headers).

Each hostile file is made by hand (a GGUF whose tensor count is 2^62, a safetensors header length of 2^60,
ONNX external data in "../x" or a FIFO, a .pte whose program runs past the end, ...) and must be refused
in one line naming the file, within seconds (an alarm turns a hang into a failure) and with a peak of
Python allocations far under 64 MiB (tracemalloc). The same checks on the session's real artifacts,
through `runtimes.load`, are in tests/runtimes/test_headers.py.
"""

import contextlib
import json
import os
import signal
import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from models.errors import EdgesmithError
from models.headers import check_safetensors
from runtimes.headers import gguf_header, onnx_header, pte_header

PEAK_LIMIT = 4 << 20  # "well under 64 MiB": the hostile files below claim up to 2^63 bytes


@pytest.fixture(scope="module", autouse=True)
def _warm_imports():
    """The checkers import gguf and onnx lazily: import them before any peak of allocations is measured."""
    pytest.importorskip("gguf.constants")
    pytest.importorskip("onnx")


@contextlib.contextmanager
def within(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def refused(check, path: Path, *args, match: str = "") -> str:
    """Run `check(path, *args)`: it must raise EdgesmithError in one line naming `path` (and `match`), within
    5 s and with a small peak of allocations. Returns the message."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with within(5), pytest.raises(EdgesmithError) as e:
            check(path, *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(e.value)
    assert "\n" not in message and str(path.parent) in message and path.name in message, message
    assert match in message, message
    assert peak < PEAK_LIMIT and time.perf_counter() - start < 5, (peak, message)
    return message


def written(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


# ----------------------------------------------------------------------------- GGUF, by hand

def gstr(b: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(b) if length is None else length) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key.encode()) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims, ggml_type: int = 0, offset: int = 0) -> bytes:
    return (gstr(name.encode()) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ggml_type, offset))


TOKENS = struct.pack("<IQ", 8, 3) + b"".join(gstr(t) for t in (b"a", b"b", b"<|bos|>"))
GOOD_KVS = [kv("general.architecture", 8, gstr(b"llama")), kv("general.alignment", 4, struct.pack("<I", 32)),
            kv("tokenizer.ggml.tokens", 9, TOKENS)]
GOOD_TENSORS = [tensor_info("w", [4, 2], 0, 0), tensor_info("b", [32], 8, 32)]  # F32 (32 bytes), Q8_0 (34)


def gguf(kvs=GOOD_KVS, tensors=GOOD_TENSORS, n_kv=None, n_tensors=None, version=3, magic=b"GGUF",
         data=bytes(66)) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % 32) + data


def with_kv(entry: bytes) -> bytes:
    return gguf(kvs=[*GOOD_KVS, entry])


def with_tensor(entry: bytes) -> bytes:
    return gguf(tensors=[*GOOD_TENSORS, entry])


HOSTILE_GGUF = {
    "n_tensors 2^62": (gguf(n_tensors=2**62), "cannot fit"),
    "n_kv 2^62": (gguf(n_kv=2**62), "cannot fit"),
    "key length 2^63": (with_kv(gstr(b"k", 2**63) + b"\0" * 16), "key 3 needs 9223372036854775808 bytes"),
    "string value length 2^63": (with_kv(kv("general.name", 8, gstr(b"x", 2**63))), "'general.name'"),
    "array of 2^40 uint8": (with_kv(kv("a", 9, struct.pack("<IQ", 0, 2**40))), "array of 1099511627776 items"),
    "array of 2^40 strings": (with_kv(kv("a", 9, struct.pack("<IQ", 8, 2**40))), "array of 1099511627776 items"),
    "string 2^63 in an array": (with_kv(kv("a", 9, struct.pack("<IQ", 8, 2) + gstr(b"x") + gstr(b"", 2**63))),
                                "'a'[1]"),
    "nested array of 2^40": (with_kv(kv("a", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 2**40))),
                             "'a'[0]: array of 1099511627776 items"),
    "arrays nested 100 deep": (with_kv(kv("a", 9, struct.pack("<IQ", 9, 1) * 100 + struct.pack("<IQ", 0, 0))),
                               "nested more than"),
    "unknown value type": (with_kv(kv("a", 99, b"\0" * 8)), "unknown value type 99"),
    "unknown array item type": (with_kv(kv("a", 9, struct.pack("<IQ", 77, 1))), "unknown value type 77"),
    "alignment not a power of two": (gguf(kvs=[GOOD_KVS[0], kv("general.alignment", 4, struct.pack("<I", 48))]),
                                     "not a power of two"),
    "alignment not uint32": (gguf(kvs=[GOOD_KVS[0], kv("general.alignment", 10, struct.pack("<Q", 32))]),
                             "must be uint32"),
    "a key twice": (with_kv(GOOD_KVS[0]), "appears twice"),
    "tensor offset past the end": (with_tensor(tensor_info("c", [4], 0, 2**40)), "past the end"),
    "tensor data past the end": (with_tensor(tensor_info("c", [2**20], 0, 96)), "past the end"),
    "tensor offset misaligned": (with_tensor(tensor_info("c", [1], 0, 68)), "not a multiple"),
    "unknown ggml type": (with_tensor(tensor_info("c", [4], 99, 96)), "unknown ggml type 99"),
    "5 dimensions": (with_tensor(tensor_info("c", [1] * 5, 0, 96)), "5 dimensions"),
    "a dimension of 0": (with_tensor(tensor_info("c", [4, 0], 0, 96)), "dimension of 0"),
    "row not whole blocks": (with_tensor(tensor_info("c", [33], 8, 96)), "32-element blocks"),
    "tensor name of 2^63": (with_tensor(gstr(b"c", 2**63)), "tensor 2 name"),
    "tensor name of 64 bytes": (with_tensor(tensor_info("c" * 64, [1], 0, 96)), "64 bytes or longer"),
    "tensor listed twice": (with_tensor(tensor_info("w", [4, 2], 0, 0)), "appears twice"),
    "wrong magic": (gguf(magic=b"GGML"), "not a GGUF file"),
    "version 1": (gguf(version=1), "GGUF version 1"),
    "big-endian": (gguf(version=3 << 24), "big-endian"),
    "truncated in the counts": (gguf()[:20], "the GGUF header"),
    "truncated in a key": (gguf(tensors=[], data=b"")[:70], "key 1 length needs 8 bytes, only 1 left"),
}


def test_a_good_hand_made_gguf_passes(tmp_path):
    # setup
    path = tmp_path / "good.gguf"
    path.write_bytes(gguf())
    # execute
    summary = gguf_header(path)
    # assert
    assert summary == {"version": 3, "tensors": 2, "keys": 3, "alignment": 32, "architecture": "llama",
                       "tokens": 3, "data_offset": len(gguf()) - 66}


@pytest.mark.parametrize("case", list(HOSTILE_GGUF))
def test_a_hostile_gguf_is_refused_in_one_line(case, tmp_path):
    # setup
    data, match = HOSTILE_GGUF[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    # execute / assert
    refused(gguf_header, path, match=match)


# ----------------------------------------------------------------------------- safetensors, by hand

def safetensors(header: object, data: bytes = bytes(16), length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD_ST = {"__metadata__": {"format": "pt"}, "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


def tensor(**fields) -> dict:
    return {"w": {**GOOD_ST["w"], **fields}}


HOSTILE_SAFETENSORS = {
    "header length 2^60": (safetensors(GOOD_ST, length=2**60), "exceeds the file"),
    "header length past the file": (safetensors(GOOD_ST, length=200), "exceeds the file"),
    "file of 5 bytes": (b"\x10\0\0\0\0", "too short"),
    "offsets past the end": (safetensors(tensor(data_offsets=[0, 2**40])), "data_offsets"),
    "offsets reversed": (safetensors(tensor(data_offsets=[16, 0])), "data_offsets"),
    "offsets not ints": (safetensors(tensor(data_offsets=[0.0, 16])), "data_offsets"),
    "shape product overflow": (safetensors(tensor(shape=[2**32] * 8)), "about 2^258 bytes"),
    "shape and offsets disagree": (safetensors(tensor(shape=[3, 2])), "24 bytes, data_offsets span 16"),
    "negative dim": (safetensors(tensor(shape=[-2, -2])), "non-negative"),
    "rank 9": (safetensors(tensor(shape=[1] * 9)), "at most 8"),
    "unknown dtype": (safetensors(tensor(dtype="F128")), "not a safetensors dtype"),
    "header a list": (safetensors([1, 2]), "must be a JSON object, got list"),
    "header a string": (safetensors("w"), "must be a JSON object, got str"),
    "header not JSON": (safetensors(b"{\"w\": ", bytes(16)), "not valid JSON"),
    "header nested 100000 deep": (safetensors(b"[" * 100000 + b"]" * 100000), "not valid JSON"),
    "a key twice": (safetensors(b'{"w": {}, "w": {}}'), "appears twice"),
    "metadata not strings": (safetensors({"__metadata__": {"format": 1}}), "__metadata__"),
    "tensor not an object": (safetensors({"w": [1]}), "expected an object"),
}


def test_a_good_safetensors_file_passes(tmp_path):
    # setup
    path = written(tmp_path, "model.safetensors", safetensors(GOOD_ST))
    # execute / assert
    assert check_safetensors(path) == {"w": ("F32", (2, 2))}


@pytest.mark.parametrize("case", list(HOSTILE_SAFETENSORS))
def test_a_hostile_safetensors_file_is_refused_in_one_line(case, tmp_path):
    # setup
    data, match = HOSTILE_SAFETENSORS[case]
    path = written(tmp_path, "model.safetensors", data)
    # execute / assert
    refused(check_safetensors, path, match=match)


# ----------------------------------------------------------------------------- ONNX, by hand

def onnx_model(location: str = "weights.bin", offset: int = 0, length: int | None = 16, dims=(4,),
               in_subgraph: bool = False) -> bytes:
    """y = x + w with `w` (4 floats) stored externally; or `w` a Constant inside an If's then-branch."""
    from onnx import TensorProto, helper

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims))
    w.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), **({"length": str(length)} if length is not None else {})}
    for key, value in entries.items():
        w.external_data.add(key=key, value=value)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    if in_subgraph:
        branch = helper.make_graph([helper.make_node("Constant", [], ["wc"], value=w)], "then", [], [
            helper.make_tensor_value_info("wc", TensorProto.FLOAT, [4])])
        nodes = [helper.make_node("If", ["c"], ["w"], then_branch=branch, else_branch=branch),
                 helper.make_node("Add", ["x", "w"], ["y"])]
        inits = [helper.make_tensor("c", TensorProto.BOOL, [], [True])]
    else:
        nodes, inits = [helper.make_node("Add", ["x", "w"], ["y"])], [w]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.fixture
def onnx_dir(tmp_path) -> Path:
    """An artifact-like folder: model.onnx + weights.bin (16 bytes); secret.bin outside it."""
    d = tmp_path / "art"
    d.mkdir()
    (d / "weights.bin").write_bytes(bytes(16))
    (tmp_path / "secret.bin").write_bytes(bytes(64))
    return d


def test_a_good_onnx_with_external_data_passes(onnx_dir):
    # setup
    path = written(onnx_dir, "model.onnx", onnx_model())
    # execute
    summary = onnx_header(path, onnx_dir, files=["model.onnx", "weights.bin"])
    # assert
    assert summary == {"ir_version": summary["ir_version"], "opset": 17, "nodes": 1, "initializers": 1,
                       "external_tensors": 1, "external_files": ["weights.bin"]}


def _symlink_out(d: Path) -> str:
    (d / "link.bin").symlink_to(d.parent / "secret.bin")
    return "link.bin"


def _fifo(d: Path) -> str:
    os.mkfifo(d / "fifo.bin")
    return "fifo.bin"


HOSTILE_ONNX = {  # name -> (make a location in the folder, model keywords, files, match)
    "location ../x": (lambda d: "../secret.bin", {}, None, "goes up with '..'"),
    "location /etc/passwd": (lambda d: "/etc/passwd", {}, None, "absolute path"),
    "symlink leaving the folder": (_symlink_out, {}, None, "leaves its directory"),
    "a FIFO": (_fifo, {}, None, "a FIFO, not a regular file"),
    "offset + length past the end": (lambda d: "weights.bin", {"offset": 8}, None, "lies outside 'weights.bin'"),
    "offset 2^63": (lambda d: "weights.bin", {"offset": 2**63}, None, "lies outside"),
    "length not the tensor's": (lambda d: "weights.bin", {"length": 12}, None, "needs 16"),
    "dims 2^40 without length": (lambda d: "weights.bin", {"length": None, "dims": (2**40,)}, None, "lies outside"),
    "negative dims": (lambda d: "weights.bin", {"dims": (-4,)}, None, "negative dimension"),
    "not one of the files": (lambda d: "weights.bin", {}, ["model.onnx"], "not one of the artifact's files"),
    "missing location": (lambda d: "", {}, None, "non-empty relative path"),
    "in an If subgraph, ../x": (lambda d: "../secret.bin", {"in_subgraph": True}, None, "goes up with '..'"),
}


@pytest.mark.parametrize("case", list(HOSTILE_ONNX))
def test_a_hostile_onnx_is_refused_in_one_line(case, onnx_dir):
    # setup
    make, kwargs, files, match = HOSTILE_ONNX[case]
    path = written(onnx_dir, "model.onnx", onnx_model(make(onnx_dir), **kwargs))
    # execute / assert
    refused(onnx_header, path, onnx_dir, files, match=match)


@pytest.mark.parametrize("data, match", [(b"\x0a\xff\xff\xff\xff\x0f", "not a readable ONNX model"),
                                         (b"", "no graph")], ids=["garbage", "empty"])
def test_an_onnx_that_is_not_protobuf_is_refused(data, match, onnx_dir):
    # setup
    path = written(onnx_dir, "model.onnx", data)
    # execute / assert
    refused(onnx_header, path, onnx_dir, match=match)


def test_an_onnx_over_2_gib_is_refused_unread(onnx_dir):
    # setup: a sparse file (no disk used)
    path = onnx_dir / "model.onnx"
    with open(path, "wb") as f:
        f.truncate((2 << 30) + 1)
    # execute / assert
    refused(onnx_header, path, onnx_dir, match="2 GiB")


# ----------------------------------------------------------------------------- .pte, by hand

def pte(program: int = 96, base: int = 128, segments: int = 32, size: int = 160, identifier: bytes = b"ET12",
        eh_length: int = 32, root: int = 48) -> bytes:
    head = struct.pack("<I", root) + identifier + b"eh00" + struct.pack("<IQQQ", eh_length, program, base, segments)
    return (head + bytes(size))[:size]


HOSTILE_PTE = {
    "program size past the end": (pte(program=10**12), "program size 1000000000000 lies outside"),
    "segment base past the end": (pte(base=2**62), "segment base offset"),
    "segment data past the end": (pte(segments=2**63), "segment data"),
    "segments without a base": (pte(base=0), "without a segment base offset"),
    "wrong identifier": (pte(identifier=b"PK\x03\x04"), "not an ExecuTorch program"),
    "truncated before the identifier": (pte()[:6], "too short"),
    "truncated in the extended header": (pte()[:20], "too short for its extended header"),
    "extended header length 4": (pte(eh_length=4), "length 4"),
    "root offset past the program": (pte(root=5000), "root offset 5000"),
}


def test_a_good_hand_made_pte_passes(tmp_path):
    # setup
    path = written(tmp_path, "model.pte", pte())
    # execute / assert
    assert pte_header(path) == {"identifier": "ET12", "program_bytes": 96, "segment_base_offset": 128,
                                "segment_bytes": 32, "extended_header": True}


@pytest.mark.parametrize("case", list(HOSTILE_PTE))
def test_a_hostile_pte_is_refused_in_one_line(case, tmp_path):
    # setup
    data, match = HOSTILE_PTE[case]
    path = written(tmp_path, "model.pte", data)
    # execute / assert
    refused(pte_header, path, match=match)


def onnx_in_its_folder(path: Path) -> dict:
    return onnx_header(path, path.parent)


@pytest.mark.parametrize("check", [gguf_header, check_safetensors, onnx_in_its_folder, pte_header],
                         ids=lambda f: f.__name__)
def test_a_fifo_or_a_directory_is_refused_without_hanging(check, tmp_path):
    # setup
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    # execute / assert
    refused(check, tmp_path / "fifo", match="a FIFO")
    refused(check, tmp_path / "dir", match="a directory")

