"""Bounded checks of GGUF, ONNX and ExecuTorch .pte headers against the sizes of the files, before a runtime sees them.

A format runtime trusts its file: llama.cpp aborts the process on some corrupt GGUF headers and allocates
what a count says, ONNX Runtime follows an external-data `location` wherever it points, ExecuTorch maps
what the extended header says. So each backend first runs the checker of its format here:

- `gguf_header(path)` walks the GGUF header with `struct` (never the tensor data): magic, version 2/3,
  tensor and key counts bounded by the bytes left, every string length and array count (nested arrays
  too) checked against the bytes left *before* it is read or skipped, value types known, and every
  tensor info (rank <= 4, dims > 0, a known ggml type, offset aligned to `general.alignment`, its bytes
  inside the data section).
- `onnx_header(path, directory, files)` parses the graph without its external data (the file itself is
  at most 2 GiB, protobuf's limit) and checks every tensor stored outside it (initializers, and tensors in
  node attributes and subgraphs): a `location` confined to the directory (models.confine), one of the
  artifact's `files` when given, and `offset + length` inside that file, `length` the tensor's size.
- `pte_header(path)` checks the flatbuffer file identifier and the extended header ("eh00": its length,
  program size, segment base offset, segment data size) against the file's size; the backend then loads
  the program with ExecuTorch's full flatbuffer verification (`Verification.InternalConsistency`).

Each returns a small summary (for `edgesmith verify`) or raises EdgesmithError in one line naming the
file. This module does not run anything, hash files (runtimes.artifact) or check safetensors (models.headers).
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path, PurePosixPath

from models.confine import confined, open_regular, regular_file
from models.errors import EdgesmithError

# ----------------------------------------------------------------------------- GGUF

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp's limit on a tensor name, NUL included
KEY_LIMIT = 1 << 16
DEFAULT_ALIGNMENT = 32
NESTING_LIMIT = 8  # arrays of arrays: llama.cpp reads none, gguf-py reads them; bounded either way
# value type -> size of one fixed-size value (GGUFValueType: 8 STRING and 9 ARRAY have none)
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, UINT32 = 8, 9, 4
MIN_KV = 8 + 4 + 1  # key length, value type, one byte of value
MIN_TENSOR = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
CHUNK = 1 << 20
_U32, _U64, _U32U64 = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<IQ")


def _num(x: int) -> str:
    return str(x) if x < 1 << 64 else f"about 2^{x.bit_length() - 1}"


def _text(b: bytes | str) -> str:
    """A key or tensor name for a message: decoded, quoted, at most 80 characters."""
    s = b.decode("utf-8", "replace") if isinstance(b, bytes) else b
    return repr(s if len(s) <= 80 else s[:77] + "...")


class _Cursor:
    """Forward reads of a regular file, each checked against the bytes left before anything is read or
    allocated, buffered a chunk at a time (a 32000-token vocabulary is 100,000 tiny strings)."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path
        self.buf, self.base, self.pos = b"", 0, 0

    def fail(self, what: str) -> EdgesmithError:
        return EdgesmithError(f"{self.path}: {what} (GGUF header at byte {self.pos} of {self.size}; corrupt or "
                              "truncated)")

    def need(self, n: int, what: str) -> int:
        """Make `n` bytes at the position readable; their offset in the buffer."""
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {_num(n)} bytes, only {self.size - self.pos} left")
        off = self.pos - self.base
        if off + n > len(self.buf):
            self.f.seek(self.pos)
            self.buf, self.base, off = self.f.read(min(max(n, CHUNK), self.size - self.pos)), self.pos, 0
            if len(self.buf) < n:
                raise self.fail(f"{what}: the file ended early (changed while read?)")
        return off

    def unpack(self, s: struct.Struct, what: str) -> tuple:
        off = self.need(s.size, what)
        self.pos += s.size
        return s.unpack_from(self.buf, off)

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {_num(n)} bytes, only {self.size - self.pos} left")
        self.pos += n

    def string(self, what: str, limit: int | None = None) -> bytes | None:
        """A GGUF string (uint64 length + bytes); read when at most `limit` long, else skipped (None)."""
        (n,) = self.unpack(_U64, f"{what} length")
        if limit is not None and n <= limit:
            off = self.need(n, what)
            self.pos += n
            return self.buf[off:off + n]
        self.skip(n, what)
        return None

    def skip_strings(self, count: int, what: str) -> None:
        """`count` strings, skipped: the hot loop of a tokenizer's vocabulary and merges."""
        buf, base, pos, size, unpack_from = self.buf, self.base, self.pos, self.size, _U64.unpack_from
        for i in range(count):
            if pos - base + 8 > len(buf):
                self.pos = pos
                self.need(8, f"{what}[{i}] length")
                buf, base = self.buf, self.base
            (n,) = unpack_from(buf, pos - base)
            pos += 8
            if n > size - pos:
                self.pos = pos
                raise self.fail(f"{what}[{i}] needs {_num(n)} bytes, only {size - pos} left")
            pos += n
        self.pos = pos


def _value_type(cur: _Cursor, t: int, what: str) -> int:
    if t not in SCALAR_SIZES and t not in (STRING, ARRAY):
        raise cur.fail(f"{what} has unknown value type {t}")
    return t


def _skip_array(cur: _Cursor, what: str, depth: int = 0) -> int:
    """Skip an array value (item type + count + items); its count."""
    if depth >= NESTING_LIMIT:
        raise cur.fail(f"{what}: arrays nested more than {NESTING_LIMIT} deep")
    t, count = cur.unpack(_U32U64, f"{what} array header")
    _value_type(cur, t, f"{what} item")
    least = SCALAR_SIZES.get(t) or (8 if t == STRING else 12)
    if count * least > cur.size - cur.pos:
        raise cur.fail(f"{what}: array of {_num(count)} items needs at least {_num(count * least)} bytes, only "
                       f"{cur.size - cur.pos} left")
    if t in SCALAR_SIZES:
        cur.skip(count * SCALAR_SIZES[t], what)
    elif t == STRING:
        cur.skip_strings(count, what)
    else:
        for i in range(count):
            _skip_array(cur, f"{what}[{i}]", depth + 1)
    return count


def _kv(cur: _Cursor, i: int, summary: dict) -> bytes:
    key = cur.string(f"key {i}", limit=KEY_LIMIT)
    if key is None:
        raise cur.fail(f"key {i} is longer than {KEY_LIMIT} bytes")
    name, label = key.decode("utf-8", "replace"), _text(key)
    (t,) = cur.unpack(_U32, f"{label} value type")
    _value_type(cur, t, label)
    if t in SCALAR_SIZES:
        if name == "general.alignment":
            if t != UINT32:
                raise cur.fail(f"general.alignment has value type {t}, must be uint32 ({UINT32})")
            (alignment,) = cur.unpack(_U32, "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise cur.fail(f"general.alignment {alignment} is not a power of two")
            summary["alignment"] = alignment
        else:
            cur.skip(SCALAR_SIZES[t], label)
    elif t == STRING:
        value = cur.string(label, limit=256 if name == "general.architecture" else None)
        if name == "general.architecture":
            summary["architecture"] = value.decode("utf-8", "replace") if value is not None else "?"
    else:
        count = _skip_array(cur, label)
        if name == "tokenizer.ggml.tokens":
            summary["tokens"] = count
    return key


def _tensor_info(cur: _Cursor, i: int, sizes: dict) -> tuple[bytes, int, int]:
    """(name, offset, bytes) of tensor info `i`, its shape and type checked."""
    name = cur.string(f"tensor {i} name", limit=GGML_MAX_NAME - 1)
    if name is None:
        raise cur.fail(f"tensor {i} name is {GGML_MAX_NAME} bytes or longer (llama.cpp's limit)")
    label = f"tensor {_text(name)}"
    (n_dims,) = cur.unpack(_U32, f"{label} n_dims")
    if n_dims > GGML_MAX_DIMS:
        raise cur.fail(f"{label} has {n_dims} dimensions, at most {GGML_MAX_DIMS}")
    dims = [cur.unpack(_U64, f"{label} dims")[0] for _ in range(n_dims)]
    if not all(dims):
        raise cur.fail(f"{label} has a dimension of 0 ({dims})")
    ggml_type, offset = cur.unpack(_U32U64, f"{label} type and offset")
    if ggml_type not in sizes:
        raise cur.fail(f"{label} has unknown ggml type {ggml_type}")
    block, type_size = sizes[ggml_type]
    if dims and dims[0] % block:
        raise cur.fail(f"{label} row of {dims[0]} is not a whole number of {block}-element blocks")
    numel = 1
    for d in dims:
        numel *= d
    return name, offset, numel // block * type_size


def gguf_header(path: str | Path) -> dict:
    """{"version", "tensors", "keys", "alignment", "architecture", "tokens", "data_offset"} of a GGUF file
    whose header is consistent with its size; one line naming the file and the first thing wrong otherwise."""
    from gguf.constants import GGML_QUANT_SIZES

    path = Path(path)
    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    with open_regular(path) as f:
        cur = _Cursor(f, os.fstat(f.fileno()).st_size, path)
        cur.need(min(cur.size, 24), "the GGUF header")
        if cur.buf[:4] != GGUF_MAGIC:
            raise EdgesmithError(f"{path}: not a GGUF file (magic {cur.buf[:4]!r}, expected {GGUF_MAGIC!r})")
        cur.need(24, "the GGUF header (magic, version, counts)")
        version = _U32.unpack_from(cur.buf, 4)[0]
        if version not in GGUF_VERSIONS:
            swapped = struct.unpack(">I", cur.buf[4:8])[0]
            why = ("big-endian GGUF (this runtime reads little-endian)" if swapped in GGUF_VERSIONS else
                   f"GGUF version {version}; allowed: {', '.join(map(str, GGUF_VERSIONS))}")
            raise EdgesmithError(f"{path}: {why}")
        n_tensors, n_kv = struct.unpack_from("<QQ", cur.buf, 8)
        cur.pos = 24
        if n_kv * MIN_KV + n_tensors * MIN_TENSOR > cur.size - cur.pos:
            raise cur.fail(f"{_num(n_tensors)} tensors and {_num(n_kv)} keys cannot fit in "
                           f"{cur.size - cur.pos} bytes")
        summary = {"version": version, "tensors": n_tensors, "keys": n_kv, "alignment": DEFAULT_ALIGNMENT}
        keys = set()
        for i in range(n_kv):
            key = _kv(cur, i, summary)
            if key in keys:
                raise cur.fail(f"key {_text(key)} appears twice")
            keys.add(key)
        infos, names = [], set()
        for i in range(n_tensors):
            infos.append(_tensor_info(cur, i, sizes))
            if infos[-1][0] in names:
                raise cur.fail(f"tensor {_text(infos[-1][0])} appears twice")
            names.add(infos[-1][0])
    alignment = summary["alignment"]
    data_offset = -(-cur.pos // alignment) * alignment
    data_size = cur.size - data_offset
    for name, offset, nbytes in infos:
        label = f"{path}: tensor {_text(name)}"
        if offset % alignment:
            raise EdgesmithError(f"{label} offset {offset} is not a multiple of general.alignment {alignment}")
        if offset + nbytes > data_size:
            raise EdgesmithError(f"{label} data [{offset}, {_num(offset + nbytes)}) ends past the end of the "
                                 f"data section ({max(data_size, 0)} bytes; truncated or corrupt)")
    summary.setdefault("architecture", None)
    summary["data_offset"] = data_offset
    return summary


# ----------------------------------------------------------------------------- ONNX

ONNX_LIMIT = 2 << 30  # protobuf cannot hold more: larger graphs keep their weights in external data
EXTERNAL = 1  # TensorProto.EXTERNAL
# TensorProto.DataType -> bits per element (sub-byte types are packed); STRING (8) has no fixed size
ONNX_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 14: 64, 15: 128,
             16: 16, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4, 24: 8, 25: 2, 26: 2, 27: 6, 28: 6}


def _graph_tensors(model):
    """(tensor, where) for every TensorProto of the model: initializers (sparse ones too) and the tensors
    of node attributes, in the main graph, every subgraph (If / Loop / Scan bodies) and every function."""
    graphs = [(model.graph, "graph")]
    bodies = [(fn.node, f"function {_text(fn.name)}") for fn in model.functions]
    while graphs or bodies:
        if graphs:
            g, where = graphs.pop()
            yield from ((t, f"{where} initializer") for t in g.initializer)
            for st in g.sparse_initializer:
                yield from ((t, f"{where} sparse initializer") for t in (st.values, st.indices))
            bodies.append((g.node, where))
            continue
        nodes, where = bodies.pop()
        for node in nodes:
            for a in node.attribute:
                at = f"{where} node {_text(node.name)} attribute {_text(a.name)}"
                if a.HasField("t"):
                    yield a.t, at
                yield from ((t, at) for t in a.tensors)
                sparse = [a.sparse_tensor] if a.HasField("sparse_tensor") else []
                for st in [*sparse, *a.sparse_tensors]:
                    yield from ((t, at) for t in (st.values, st.indices))
                subgraphs = [a.g] if a.HasField("g") else []
                graphs.extend((sub, f"{at} subgraph") for sub in [*subgraphs, *a.graphs])


def _external(path: Path, directory: Path, files, t, where: str, sizes: dict) -> str:
    """Check one externally stored tensor; its location."""
    label = f"{path}: {where} tensor {_text(t.name)}"
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location")
    target = confined(directory, location, holder=path, what="external data")
    location = PurePosixPath(location).as_posix()  # "./w.bin" is the manifest's "w.bin"
    if files is not None and location not in files:
        raise EdgesmithError(f"{label}: external data {_text(location)} is not one of the artifact's files "
                             "(manifest.json)")
    if location not in sizes:
        sizes[location] = regular_file(target)
    bits = ONNX_BITS.get(t.data_type)
    if bits is None:
        raise EdgesmithError(f"{label}: data type {t.data_type} cannot be stored as external data")
    numel = 1
    for d in t.dims:
        numel *= d
    nbytes = -(-numel * bits // 8)
    try:
        offset, length = int(info.get("offset", 0)), int(info.get("length", nbytes))
    except ValueError:
        raise EdgesmithError(f"{label}: external data offset/length {info.get('offset')!r}/{info.get('length')!r} "
                             "are not integers") from None
    if length != nbytes:
        raise EdgesmithError(f"{label}: external data length {_num(length)}, its shape {list(t.dims)[:8]} needs "
                             f"{_num(nbytes)}")
    if offset < 0 or offset + length > sizes[location]:
        raise EdgesmithError(f"{label}: external data [{_num(offset)}, {_num(offset + length)}) lies outside "
                             f"{_text(location)} ({sizes[location]} bytes)")
    return location


def read_onnx(path: str | Path, directory: str | Path, files=None):
    """(summary, ModelProto without external data) of an ONNX file checked as `onnx_header` says: the backend
    passes the parsed graph on instead of parsing it twice."""
    import onnx
    from google.protobuf.message import DecodeError

    path, directory = Path(path), Path(directory)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > ONNX_LIMIT:
            raise EdgesmithError(f"{path}: {size} bytes, more than protobuf's 2 GiB (weights belong in external "
                                 "data)")
        data = f.read(size + 1)  # what it holds (read(limit) would allocate the limit first)
    if len(data) != size:
        raise EdgesmithError(f"{path}: changed while it was read ({len(data)} bytes, {size} expected)")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, RecursionError, ValueError) as e:
        raise EdgesmithError(f"{path}: not a readable ONNX model ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:120]})") from None
    del data
    if not model.HasField("graph"):
        raise EdgesmithError(f"{path}: not an ONNX model (no graph)")
    locations, n_external, sizes = set(), 0, {}
    for t, where in _graph_tensors(model):
        if any(d < 0 for d in t.dims):
            raise EdgesmithError(f"{path}: {where} tensor {_text(t.name)} has a negative dimension {list(t.dims)[:8]}")
        if t.data_location == EXTERNAL:
            locations.add(_external(path, directory, files, t, where, sizes))
            n_external += 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    summary = {"ir_version": model.ir_version, "opset": opset, "nodes": len(model.graph.node),
               "initializers": len(model.graph.initializer), "external_tensors": n_external,
               "external_files": sorted(locations)}
    return summary, model


def onnx_header(path: str | Path, directory: str | Path, files=None) -> dict:
    """{"ir_version", "opset", "nodes", "initializers", "external_tensors", "external_files"} of an ONNX file
    (at most 2 GiB) whose externally stored tensors all lie inside `directory` (in `files` when given: the
    manifest's file names) and inside their files; one line naming the file and what is wrong otherwise."""
    return read_onnx(path, directory, files)[0]


# ----------------------------------------------------------------------------- ExecuTorch .pte

PTE_IDENTIFIER = re.compile(rb"ET[0-9a-zA-Z]{2}")  # flatbuffer file_identifier, "ET12" for schema version 12
EH_MAGIC = b"eh00"
EH_MIN_LENGTH = 4 + 4 + 8 + 8  # magic, length, program size, segment base offset
EH_SEGMENT_SIZE_LENGTH = EH_MIN_LENGTH + 8  # and segment data size
PTE_HEAD = 64  # ExecuTorch reads this much to find the header (kNumHeadBytes)


def pte_header(path: str | Path) -> dict:
    """{"identifier", "program_bytes", "segment_base_offset", "segment_bytes", "extended_header"} of an
    ExecuTorch program whose flatbuffer identifier and extended header agree with the file's size; one
    line naming the file and what is wrong otherwise. The flatbuffer itself is verified by ExecuTorch
    (`Verification.InternalConsistency`) when the backend loads it."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(PTE_HEAD)
    if len(head) < 8:
        raise EdgesmithError(f"{path}: {size} bytes, too short for an ExecuTorch program (truncated)")
    root, identifier = _U32.unpack_from(head)[0], head[4:8]
    if not PTE_IDENTIFIER.fullmatch(identifier):
        raise EdgesmithError(f"{path}: not an ExecuTorch program (file identifier {identifier!r}, expected ET..)")
    summary = {"identifier": identifier.decode(), "program_bytes": size, "segment_base_offset": 0,
               "segment_bytes": 0, "extended_header": head[8:12] == EH_MAGIC}
    if summary["extended_header"]:
        if len(head) < 8 + EH_MIN_LENGTH:
            raise EdgesmithError(f"{path}: {size} bytes, too short for its extended header (truncated)")
        length, program, base = struct.unpack_from("<IQQ", head, 12)
        segments = _U64.unpack_from(head, 32)[0] if length >= EH_SEGMENT_SIZE_LENGTH and len(head) >= 40 else 0
        where = f"{path}: extended header"
        if not EH_MIN_LENGTH <= length <= PTE_HEAD - 8:
            raise EdgesmithError(f"{where} length {length}, expected {EH_MIN_LENGTH}..{PTE_HEAD - 8} (corrupt)")
        if not 8 + length <= program <= size:
            raise EdgesmithError(f"{where} program size {_num(program)} lies outside the file ({size} bytes; "
                                 "truncated or corrupt)")
        if base and not program <= base <= size:
            raise EdgesmithError(f"{where} segment base offset {_num(base)} lies outside [{program}, {size}] "
                                 "(truncated or corrupt)")
        if segments and not base:
            raise EdgesmithError(f"{where} segment data size {_num(segments)} without a segment base offset "
                                 "(corrupt)")
        if base + segments > size:
            raise EdgesmithError(f"{where} segment data [{base}, {_num(base + segments)}) ends past the end of "
                                 f"the file ({size} bytes; truncated or corrupt)")
        summary.update(program_bytes=program, segment_base_offset=base, segment_bytes=segments)
    if not 8 <= root < summary["program_bytes"]:
        raise EdgesmithError(f"{path}: flatbuffer root offset {root} lies outside the program "
                             f"({summary['program_bytes']} bytes; corrupt)")
    return summary
