"""The cases of scripts/fuzz_readers.py: valid seed files, hypothesis mutations of them, and the reader call.

Seeds are built once into `<work>/seeds/` from the nano model (max_seq_len 128) trained for a few steps and
exported with the real exporters: GGUF fp32 and Q4_0, ONNX fused, plain, 4-bit and fused with external data,
ExecuTorch fp32 and 8da4w; its float and RTN 4-bit checkpoints; the bundled recipes and device profiles.
`seeds.json` lists them, so a rerun rebuilds nothing.

A case is one seed with a list of mutation ops (JSON-serialisable dicts, recorded with every finding):
byte ops (truncate, flip, set, insert, delete, splice with another seed of the same reader, a little-endian
integer 0, 1, -1, 2^31-1, 2^32, 2^62, 2^63-1 written over an integer field of the header), and
structure-aware ops (a JSON value or key replaced, a TOML line edited, a safetensors header entry changed,
an ONNX tensor's dims, type, raw data or external-data entry changed). `write_case` writes the case
directory and, for a file whose sha256 and size a manifest or edgesmith.json records, rewrites that record,
so the reader under test parses the bytes instead of refusing them at the sha256 check. `run_case` is what
the worker calls: the user-facing reader (runtimes.load + one prefill, load_checkpoint, load_recipe,
load_profile). This module does not supervise, time or count anything (scripts/fuzz_readers.py does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st

import runtimes
from devices.profiles import PROFILE_DIR, load_profile
from models.checkpoint import load_checkpoint, save_checkpoint
from models.llama import SIZES, Transformer
from models.quant import quantize_linear_
from models.tokenizer import train_tokenizer
from toolchain.export import ExportConfig, export
from toolchain.export.parity import PARITY_TEXT, torch_threads
from toolchain.recipe import BUNDLED, load_recipe

READERS = ("gguf", "safetensors", "onnx", "pte", "manifest", "tokenizer", "config", "recipe", "profile")
ARTIFACT_READERS = ("gguf", "onnx", "pte", "manifest", "tokenizer")
CONFIG = dataclasses.replace(SIZES["nano"], max_seq_len=128)  # short: small KV caches in every runtime
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n\nÜnïcödé ✓ 漢字 emoji 🚀 and tabs\tand newlines\n") * 40 + PARITY_TEXT * 20
# name -> (checkpoint, export config); the ONNX seed with external data is made from "onnx" (see onnx_external)
EXPORTS = {"gguf": ("float", ExportConfig(format="gguf")), "gguf-q4": ("q4", ExportConfig(format="gguf")),
           "onnx": ("float", ExportConfig(format="onnx")),
           "onnx-plain": ("float", ExportConfig(format="onnx", fuse=False)),
           "onnx-q4": ("q4", ExportConfig(format="onnx")), "pte": ("float", ExportConfig(format="executorch")),
           "pte-q4": ("q4", ExportConfig(format="executorch"))}
SLOW = ("pte-q4",)
INTS = (0, 1, -1, 2**31 - 1, 2**32, 2**62, 2**63 - 1)
JSON_VALUES = (None, True, False, 0, 1, -1, 2**31 - 1, 2**32, 2**62, 2**63 - 1, 2**64, -2**63, 1.5, 1e308, -0.0,
               float("inf"), float("nan"), "", "x", "../../../../etc/passwd", "/etc/passwd", "/dev/zero", ".", "..",
               "model.gguf", "manifest.json", "sub/../../x", "\x00", "A" * 70000, [], {}, [0, -1], {"a": 1}, "<deep>")
TOML_VALUES = ("0", "-1", "2147483647", "4294967296", "4611686018427387904", "9223372036854775807",
               "-9223372036854775808", "1e999", "inf", "nan", "-inf", "0.0", "1e-300", '""', '"x"',
               '"../../etc/passwd"', '"/dev/zero"', "[]", "{}", "true", "1979-05-27T07:32:00Z", "1979-05-27",
               "07:32:00", '[1, "a"]', "{a = 1}", '"local"', '"nano"', '"gguf"', '"A"' + "A" * 5000 + '"')
TOML_LINES = ("[x]", "[[pass]]", "[source.train]", "[target]", "[peak_tflops]", "x = 1", 'kind = "quantize"',
              "[[x]]", "= 1", "a.b.c = 1", "[source]\ncheckpoint = '/dev/zero'", '"\\ud800" = 1', "[" * 200)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- seeds


def fit(model: Transformer, tokens: np.ndarray, steps: int = 40, batch: int = 4, seq: int = 32) -> None:
    """A few AdamW steps on random windows: peaked logits, so the exporters' greedy parity checks pass."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.from_numpy(tokens.astype(np.int64))
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=g)
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
        loss = torch.nn.functional.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def onnx_external(src: Path, out: Path) -> None:
    """The fused ONNX artifact re-saved with its weights in `model.onnx.data` (the >1 GB layout), manifest updated."""
    import onnx

    shutil.copytree(src, out)
    model = onnx.load(str(src / "model.onnx"))
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["options"]["external_data"] = True
    for name in ("model.onnx", "model.onnx.data"):
        data = (out / name).read_bytes()
        manifest["files"][name] = {"sha256": sha256(data), "bytes": len(data)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def gguf_layout(path: Path) -> tuple[list[list[int]], int]:
    """[offset, width] of every integer field of a GGUF header (counts, lengths, types, dims, offsets), and the
    offset where tensor data starts."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.__array_interface__["data"][0]
    ints = []
    for field in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
        for part in field.parts:
            if part.dtype.kind in "iu" and part.size == 1 and part.dtype.itemsize >= 4:
                ints.append([part.__array_interface__["data"][0] - base, part.dtype.itemsize])
    return sorted(ints), int(reader.data_offset)


def binary_layout(reader: str, path: Path) -> tuple[list[list[int]], int]:
    data = path.read_bytes()
    if reader == "gguf":
        return gguf_layout(path)
    if reader == "safetensors":
        return [[0, 8]], 8 + struct.unpack("<Q", data[:8])[0]
    if reader == "pte":  # flatbuffer root offset, then the extended header "eh00": length, program size, segments
        ints = [[0, 4], [12, 4], [16, 8], [24, 8], [32, 8]] if data[8:12] == b"eh00" else [[0, 4]]
        base = struct.unpack("<Q", data[24:32])[0] if data[8:12] == b"eh00" else len(data)
        return ints, min(base or len(data), len(data))
    return [], min(len(data), 4096)  # onnx: protobuf, no fixed header


def seed_record(reader: str, name: str, directory: Path, target: str, record: str | None) -> dict:
    kind = {"manifest": "json", "tokenizer": "json", "config": "json", "recipe": "toml", "profile": "toml"}.get(
        reader, "binary")
    rec = {"name": name, "dir": str(directory), "target": target, "record": record, "kind": kind,
           "ints": [], "header": 0}
    if kind == "binary":
        rec["ints"], rec["header"] = binary_layout(reader, directory / target)
    return rec


def build_checkpoints(root: Path, log) -> None:
    log("fuzz: training the seed model (nano, a few steps) ...")
    tokenizer = train_tokenizer([TEXT], vocab_size=512, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(CONFIG)
    with torch_threads(1):
        fit(model, np.array(tokenizer.encode(TEXT), dtype=np.uint16))
    save_checkpoint(model, tokenizer, root / "ckpt-float", {"parent": None, "passes": []})
    quantize_linear_(model, 4, 32)
    save_checkpoint(model, tokenizer, root / "ckpt-q4", {"parent": None, "passes": []})


def build_seeds(work: Path, quick: bool = False, log=print) -> dict[str, list[dict]]:
    """{reader: [seed record]} for every reader, built under `<work>/seeds`: what is there already is kept (every
    export is written atomically), so a rerun builds nothing. `quick` leaves out SLOW (the ExecuTorch 8da4w
    export, about 90 of the ~120 s a full build takes on 2 cores)."""
    root = work / "seeds"
    root.mkdir(parents=True, exist_ok=True)
    load_profile("local")  # measured once (cached under $EDGESMITH_CACHE), not inside the first case naming it
    index = root / ("seeds-quick.json" if quick else "seeds.json")
    if index.is_file():
        return json.loads(index.read_text())
    if not ((root / "ckpt-float").is_dir() and (root / "ckpt-q4").is_dir()):
        build_checkpoints(root, log)
    ckpts = {"float": root / "ckpt-float", "q4": root / "ckpt-q4"}
    for name, (source, cfg) in EXPORTS.items():
        if not (root / name).is_dir() and not (quick and name in SLOW):
            log(f"fuzz: exporting seed {name}")
            with torch_threads(1):
                export(ckpts[source], root / name, cfg, log=lambda line: None)
    if not (root / "onnx-ext").is_dir():
        shutil.rmtree(root / "onnx-ext.tmp", ignore_errors=True)
        onnx_external(root / "onnx", root / "onnx-ext.tmp")
        (root / "onnx-ext.tmp").rename(root / "onnx-ext")
    for kind, src in (("recipe", BUNDLED), ("profile", PROFILE_DIR)):
        for path in sorted(src.glob("*.toml")):
            (root / f"{kind}-{path.stem}").mkdir(exist_ok=True)
            shutil.copyfile(path, root / f"{kind}-{path.stem}" / f"{kind}.toml")
    artifacts = {"gguf": ["gguf", "gguf-q4"], "onnx": ["onnx", "onnx-plain", "onnx-q4", "onnx-ext"],
                 "pte": ["pte"] + ([] if quick else ["pte-q4"])}
    seeds: dict[str, list[dict]] = {r: [] for r in READERS}
    for reader, names in artifacts.items():
        for name in names:
            entry = json.loads((root / name / "manifest.json").read_text())["entry"]
            seeds[reader].append(seed_record(reader, name, root / name, entry, "manifest.json"))
    seeds["onnx"].append(seed_record("onnx", "onnx-ext-data", root / "onnx-ext", "model.onnx.data", "manifest.json"))
    for name in ("gguf", "gguf-q4", "onnx", "onnx-plain", "onnx-ext", "pte"):
        seeds["manifest"].append(seed_record("manifest", name, root / name, "manifest.json", None))
    for name in ("gguf", "onnx", "pte"):
        seeds["tokenizer"].append(seed_record("tokenizer", name, root / name, "tokenizer.json", "manifest.json"))
    for name, path in ckpts.items():
        seeds["safetensors"].append(seed_record("safetensors", f"ckpt-{name}", path, "model.safetensors",
                                                "edgesmith.json"))
        seeds["config"].append(seed_record("config", f"ckpt-{name}", path, "config.json", None))
    for kind in ("recipe", "profile"):
        for d in sorted(root.glob(f"{kind}-*")):
            seeds[kind].append(seed_record(kind, d.name, d, f"{kind}.toml", None))
    index.write_text(json.dumps(seeds, indent=1) + "\n")
    return seeds


# ----------------------------------------------------------------------------- mutations (hypothesis strategies)

KEYS = ("", "x", "name", "kind", "format", "entry", "files", "model", "options", "max_seq_len", "vocab_size",
        "hidden_size", "num_hidden_layers", "ram_gib", "formats", "bits", "device", "steps", "checkpoint", "../x")


def _at(seed: dict, size: int):
    """An offset biased toward the header (and the integer fields in it) and the end of the file."""
    header = max(1, min(seed["header"] or size, size))
    return st.one_of(st.integers(0, header - 1), st.integers(0, max(size - 1, 0)),
                     st.integers(max(size - 64, 0), max(size, 0)))


def byte_ops(seed: dict, size: int, others: list[str]):
    at = _at(seed, size)
    ops = [st.fixed_dictionaries({"op": st.just("truncate"), "at": at}),
           st.fixed_dictionaries({"op": st.just("flip"), "at": at, "bit": st.integers(0, 7)}),
           st.fixed_dictionaries({"op": st.just("set"), "at": at, "bytes": st.binary(min_size=1, max_size=8).map(
               bytes.hex)}),
           st.fixed_dictionaries({"op": st.just("int"), "at": at, "width": st.sampled_from([1, 2, 4, 8]),
                                  "value": st.sampled_from(INTS)}),
           st.fixed_dictionaries({"op": st.just("insert"), "at": at, "bytes": st.binary(min_size=1, max_size=16).map(
               bytes.hex), "repeat": st.sampled_from([1, 1, 64, 4096])}),
           st.fixed_dictionaries({"op": st.just("delete"), "at": at,
                                  "n": st.one_of(st.sampled_from([1, 2, 4, 8, 64, 4096]), st.integers(1, 1 << 16))}),
           st.fixed_dictionaries({"op": st.just("splice"), "at": at, "other": st.sampled_from(others),
                                  "from": st.integers(0, 1 << 19)})]
    if seed["ints"]:  # an integer field of the header, at its own width or wider
        ops.append(st.builds(lambda f, w, v: {"op": "int", "at": f[0], "width": w or f[1], "value": v},
                             st.sampled_from(seed["ints"]), st.sampled_from([0, 0, 4, 8]), st.sampled_from(INTS)))
    return st.one_of(*ops)


def structure_ops(reader: str, seed: dict):
    """Structure-aware ops for the seed's format, or None."""
    value = st.integers(0, len(JSON_VALUES) - 1)
    path = st.lists(st.integers(0, 1 << 16), max_size=5)
    if seed["kind"] == "json" or reader == "safetensors":
        return st.fixed_dictionaries({"op": st.just("st" if reader == "safetensors" else "json"), "path": path,
                                      "action": st.sampled_from(["set", "set", "del", "rename", "dup"]),
                                      "value": value, "key": st.sampled_from(KEYS)})
    if seed["kind"] == "toml":
        return st.fixed_dictionaries({"op": st.just("line"), "at": st.integers(0, 1 << 10),
                                      "action": st.sampled_from(["del", "dup", "swap", "value", "value", "key",
                                                                 "insert"]),
                                      "value": st.integers(0, len(TOML_VALUES) - 1), "key": st.sampled_from(KEYS),
                                      "line": st.integers(0, len(TOML_LINES) - 1), "to": st.integers(0, 1 << 10)})
    if reader == "onnx" and seed["target"].endswith(".onnx"):
        return st.fixed_dictionaries({"op": st.just("onnx"), "what": st.sampled_from(
            ["dims", "dtype", "raw", "ext", "node", "input"]), "index": st.integers(0, 1 << 16),
            "sub": st.integers(0, 1 << 16), "value": st.sampled_from(INTS)})
    return None


@st.composite
def cases(draw, reader: str, seeds: list[dict], sizes: dict[str, int]):
    """(seed name, [op]): one case of `reader`."""
    seed = draw(st.sampled_from(seeds))
    others = [s["name"] for s in seeds]
    structure = structure_ops(reader, seed)
    binary = byte_ops(seed, sizes[seed["name"]], others)
    op = binary if structure is None else st.one_of(structure, binary)
    return seed["name"], draw(st.lists(op, min_size=1, max_size=4))


# ----------------------------------------------------------------------------- applying ops


def _walk(doc, path: list[int]):
    """(parent, key) of the node `path` leads to (each step an index into a table's keys or a list), or None."""
    parent = key = None
    node = doc
    for step in path:
        if isinstance(node, (dict, list)) and node:
            key = list(node)[step % len(node)] if isinstance(node, dict) else step % len(node)
            parent, node = node, node[key]
        else:
            break
    return parent, key


DEEP = "\x01deep\x01"
EMPTY_KEY = '""'


def json_edit(raw: bytes, op: dict) -> bytes:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return raw  # an earlier op broke it: this one does nothing
    value = JSON_VALUES[op["value"]]
    value = DEEP if value == "<deep>" else value
    parent, key = _walk(doc, op["path"])
    if parent is None:
        doc = value if op["action"] == "set" else doc
    elif op["action"] == "set":
        parent[key] = value
    elif op["action"] == "del":
        del parent[key]
    elif op["action"] == "rename" and isinstance(parent, dict):
        parent[op["key"]] = parent.pop(key)
    elif op["action"] == "dup":
        if isinstance(parent, dict):
            parent[op["key"]] = parent[key]
        else:
            parent.append(parent[key])
    text = json.dumps(doc, ensure_ascii=False).replace(json.dumps(DEEP), "[" * 100000 + "]" * 100000)
    return text.encode("utf-8", "surrogatepass")


def line_edit(raw: bytes, op: dict) -> bytes:
    lines = raw.decode("utf-8", "surrogateescape").split("\n")
    i, j = op["at"] % len(lines), op["to"] % len(lines)
    line = lines[i]
    if op["action"] == "del":
        lines.pop(i)
    elif op["action"] == "dup":
        lines.insert(i, line)
    elif op["action"] == "swap":
        lines[i], lines[j] = lines[j], lines[i]
    elif op["action"] == "value" and "=" in line:
        lines[i] = f"{line.split('=', 1)[0]}= {TOML_VALUES[op['value']]}"
    elif op["action"] == "key" and "=" in line:
        lines[i] = f"{op['key'] or EMPTY_KEY} ={line.split('=', 1)[1]}"
    elif op["action"] == "insert":
        lines.insert(i, TOML_LINES[op["line"]])
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def safetensors_edit(raw: bytes, op: dict) -> bytes:
    if len(raw) < 8 or not 0 < (n := struct.unpack("<Q", raw[:8])[0]) <= len(raw) - 8:
        return raw
    header = json_edit(raw[8:8 + n], op)
    return struct.pack("<Q", len(header)) + header + raw[8 + n:]


def onnx_edit(raw: bytes, op: dict) -> bytes:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(raw)
    except (DecodeError, ValueError, RuntimeError):
        return raw
    g, what, i, j, v = model.graph, op["what"], op["index"], op["sub"], op["value"]
    inits = list(g.initializer)
    t = inits[i % len(inits)] if inits else None
    if what == "dims" and t is not None:
        dims = list(t.dims) or [1]
        dims[j % len(dims)] = v
        del t.dims[:]
        t.dims.extend(dims)
    elif what == "dtype" and t is not None:
        t.data_type = j % 26 if v else 1000
    elif what == "raw" and t is not None:
        t.raw_data = t.raw_data[: len(t.raw_data) * (j % 4) // 4] if v else t.raw_data * 2
    elif what == "ext" and t is not None:
        t.data_location = onnx.TensorProto.EXTERNAL
        del t.external_data[:]
        where = ["../../../../etc/passwd", "/dev/zero", "/etc/passwd", "model.onnx", "missing.bin", "model.onnx.data",
                 "sub/../../x", ""][j % 8]
        for key, val in (("location", where), ("offset", str(v)), ("length", str(INTS[j % len(INTS)]))):
            e = t.external_data.add()
            e.key, e.value = key, val
    elif what == "node" and g.node:
        node = g.node[i % len(g.node)]
        if j % 3 == 0:
            node.op_type = ["Loop", "Foo", "", "Identity", "If", "Scan"][v % 6]
        elif j % 3 == 1 and node.input:
            node.input[j % len(node.input)] = ["", "x", node.output[0] if node.output else "y"][v % 3]
        else:
            node.domain = ["", "com.microsoft", "x"][v % 3]
    elif what == "input" and g.input:
        dims = g.input[i % len(g.input)].type.tensor_type.shape.dim
        if dims:
            dims[j % len(dims)].dim_value = v
    return model.SerializeToString()


def apply_op(data: bytes, op: dict, others: dict[str, bytes]) -> bytes:
    kind = op["op"]
    if kind == "json":
        return json_edit(data, op)
    if kind == "line":
        return line_edit(data, op)
    if kind == "st":
        return safetensors_edit(data, op)
    if kind == "onnx":
        return onnx_edit(data, op)
    at = min(op["at"], len(data))
    if kind == "truncate":
        return data[:at]
    if kind == "flip":
        return data if at >= len(data) else data[:at] + bytes([data[at] ^ (1 << op["bit"])]) + data[at + 1:]
    if kind == "set":
        new = bytes.fromhex(op["bytes"])
        return data[:at] + new + data[at + len(new):]
    if kind == "int":
        new = (op["value"] % (1 << (8 * op["width"]))).to_bytes(op["width"], "little")
        return data[:at] + new + data[at + len(new):]
    if kind == "insert":
        return data[:at] + bytes.fromhex(op["bytes"]) * op["repeat"] + data[at:]
    if kind == "delete":
        return data[:at] + data[at + op["n"]:]
    if kind == "splice":
        other = others[op["other"]]
        return data[:at] + other[min(op["from"], len(other)):]
    raise ValueError(f"unknown op {kind!r}")


def seed_bytes(seeds: list[dict]) -> dict[str, bytes]:
    return {s["name"]: (Path(s["dir"]) / s["target"]).read_bytes() for s in seeds}


def mutate(seed: dict, ops: list[dict], originals: dict[str, bytes]) -> bytes:
    data = originals[seed["name"]]
    for op in ops:
        data = apply_op(data, op, originals)
    return data


def write_case(seed: dict, data: bytes, out: Path) -> int:
    """The case directory: the seed's files with `data` as its target (and the target's sha256 and size recorded
    where the seed records them). Returns the bytes of the largest file in it."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(seed["dir"], out)
    (out / seed["target"]).write_bytes(data)
    if seed["record"]:
        path = out / seed["record"]
        doc = json.loads(path.read_text())
        doc["files"][seed["target"]] = {"sha256": sha256(data), "bytes": len(data)}
        path.write_text(json.dumps(doc, indent=2) + "\n")
    return max(p.stat().st_size for p in out.iterdir())


# ----------------------------------------------------------------------------- the reader under test


def run_case(reader: str, case: Path) -> None:
    """The user-facing reader for `reader` on the case directory; raises what it raises."""
    if reader in ARTIFACT_READERS:
        session = runtimes.load(case)
        try:
            tok = session.tokenizer
            session.prefill(([tok.bos_id, *tok.encode("def f")] if tok is not None else [0, 1])[:3])
        finally:
            session.close()
    elif reader in ("safetensors", "config"):
        load_checkpoint(case)
    elif reader == "recipe":
        load_recipe(case / "recipe.toml")
    elif reader == "profile":
        load_profile(str(case / "profile.toml"))
    else:
        raise ValueError(f"unknown reader {reader!r}")


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBER = re.compile(r"(?<![A-Za-z_])-?\b(0x[0-9a-fA-F]+|\d+(\.\d+)?([eE][-+]?\d+)?)\b")
_PARENS = re.compile(r"\s*\([^()]*\)")
_ESCAPES = re.compile(r"(\\x[0-9a-fA-F]{2}|\\u[0-9a-fA-F]{4}|[^\x20-\x7e])+")


def refusal_class(message: str, case: Path) -> str:
    """The message with the case path, quoted values and numbers normalised, cut before any parenthesis."""
    text = message
    for prefix in (f"{case.resolve()}/", f"{case}/", str(case.resolve()), str(case)):
        text = text.replace(prefix, "")
    while (shorter := _PARENS.sub("", text)) != text:  # "(detail)" groups go, then anything after a stray "("
        text = shorter
    text = _QUOTED.sub("'…'", _ESCAPES.sub("…", text.split("(")[0]))
    text = _NUMBER.sub("N", text)
    return " ".join(text.split()).strip(" :;,")[:160]
