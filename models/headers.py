"""Bounded checks of a safetensors header, against the file's size, before any tensor is allocated.

`check_safetensors(path)` reads the 8-byte header length and the JSON header only (never the
tensor data) and checks every number in it against the size the file has: the header length
(at most the file less 8 bytes and at most 100 MiB), the dtype, the shape (non-negative ints,
rank <= 8) and the `data_offsets` of each tensor (inside the data section, exactly as long as the
shape and dtype say). A hostile header (a length of 2^60, offsets past the end, a shape whose
product overflows) is refused in one line naming the file before anything of that size is
allocated. It returns the tensors' names, dtypes and shapes; it does not read or convert tensor
data (models.checkpoint does, through `safetensors`) and does not check GGUF, ONNX or .pte
headers (runtimes.headers does).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from models.confine import open_regular
from models.errors import EdgesmithError

HEADER_LIMIT = 100 << 20  # the safetensors library's own limit on the JSON header
MAX_RANK = 8
# bits per element of every dtype the safetensors format defines (sub-byte ones are packed)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _short(x: object, n: int = 80) -> str:
    s = str(x)
    return s if len(s) <= n else s[:n - 3] + "..."


def _no_duplicates(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"key {twice[:80]!r} appears twice")
    return dict(pairs)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: int) -> str:
    """x in words short enough for one line (str() of an int of over 4300 digits raises)."""
    return str(x) if x.bit_length() <= 128 else f"about 2^{x.bit_length() - 1}"


def check_safetensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file whose header is consistent with its size;
    one line naming the file and the first thing wrong otherwise."""
    path = Path(path)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise EdgesmithError(f"{path}: {size} bytes, too short for a safetensors header length (8 bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        limit = min(size - 8, HEADER_LIMIT)
        if n > limit:
            why = "the file" if n > size - 8 else f"the {HEADER_LIMIT >> 20} MiB limit"
            raise EdgesmithError(f"{path}: safetensors header length {n} exceeds {why} "
                                 f"({size} bytes in all; truncated or corrupt)")
        raw = f.read(n)
    if len(raw) != n:
        raise EdgesmithError(f"{path}: truncated while reading its {n}-byte safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, a duplicate key, an int of 5000 digits
        raise EdgesmithError(f"{path}: safetensors header is not valid JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise EdgesmithError(f"{path}: safetensors header is not valid JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise EdgesmithError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise EdgesmithError(f"{path}: safetensors __metadata__ must map strings to strings")
            continue
        tensors[name] = _tensor(path, name, info, data_size)
    return tensors


def _tensor(path: Path, name: str, info: object, data_size: int) -> tuple[str, tuple[int, ...]]:
    where = f"{path}: tensor {name[:80]!r}"
    if not isinstance(info, dict):
        raise EdgesmithError(f"{where}: expected an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        allowed = ", ".join(DTYPE_BITS)
        raise EdgesmithError(f"{where}: dtype {_short(repr(dtype), 40)} is not a safetensors dtype; allowed: {allowed}")
    if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise EdgesmithError(f"{where}: shape {_short(shape)} must be a list of at most {MAX_RANK} "
                             "non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise EdgesmithError(f"{where}: data_offsets {_short(offsets)} must be [begin, end] with "
                             f"0 <= begin <= end <= {data_size} (the data section; truncated or corrupt)")
    numel = 1
    for d in shape:  # Python ints: a product of 8 huge dims does not overflow, it just fails the check below
        numel *= d
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
        need = f"{_num(bits // 8)} bytes" if bits % 8 == 0 else f"{_num(bits)} bits (not whole bytes)"
        raise EdgesmithError(f"{where}: shape {_short(shape)} of {dtype} is {need}, data_offsets span "
                             f"{offsets[1] - offsets[0]}")
    return dtype, tuple(shape)
