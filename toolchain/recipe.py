"""Recipes: TOML files that say what `edgesmith run` does, parsed into validated frozen dataclasses.

A recipe mirrors the configs one to one (DESIGN.md "Passes and recipes"): `[source]` (a checkpoint,
or `[source.train]` = model size + corpus + the trainer's TrainConfig fields + nproc), `[[pass]]`
tables (`kind` plus the fields of that pass's config class in the registry), `[compress]` (corpus
and evaluation settings shared by the passes), `[export]` (formats, float precision), `[target]`
(device profile, optional transport URI, bench sizes). Every problem -- an unknown key, a wrong
type, an unknown pass kind, device or format, a value a config refuses -- is one EdgesmithError
naming the key path, e.g. `pass[2].bits: 5 is not allowed; allowed: 4, 8`. `--set KEY=VALUE`
overrides are applied to the TOML document before validation. Bundled recipes live in
toolchain/recipes/. This module runs nothing (toolchain/pipeline.py does).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from devices.profiles import load_profile
from models.errors import EdgesmithError
from models.llama import SIZES
from models.registry import FORMATS, METHODS, PASSES
from models.tokenizer import MIN_VOCAB
from toolchain.compress import QUANTIZE, pass_kinds
from toolchain.export.spec import PRECISIONS
from toolchain.train.trainer import TrainConfig

BUNDLED = Path(__file__).parent / "recipes"
DEVICE_FORMATS = "device"  # export.formats / export.precision value: take them from the target's profile


@dataclass(frozen=True)
class TrainSource:
    model: str = "nano"  # a named size or a ModelConfig JSON file
    data: str = "stdlib"
    vocab_size: int | None = None  # None: the size's vocabulary
    nproc: int = 1
    train: TrainConfig = field(default_factory=TrainConfig)  # flattened into the same TOML table

    def __post_init__(self):
        if self.model not in SIZES and not self.model.endswith(".json"):
            raise EdgesmithError(f"model={self.model!r} is not one of {', '.join(SIZES)} (or a ModelConfig .json file)")
        if self.vocab_size is not None and self.vocab_size < MIN_VOCAB:
            raise EdgesmithError(f"vocab_size={self.vocab_size} is too small; byte-level BPE needs at least "
                                 f"{MIN_VOCAB}")
        if self.nproc < 1:
            raise EdgesmithError(f"nproc={self.nproc} must be an integer >= 1")


@dataclass(frozen=True)
class Source:
    checkpoint: str | None = None
    train: TrainSource | None = None


@dataclass(frozen=True)
class CompressSettings:
    data: str | None = None  # calibration (train split) and quality (validation split); None: the source's
    calib_seq_len: int = 128
    eval_seq_len: int = 128
    eval_tokens: int = 32 * 1024
    seed: int = 0
    nproc: int = 1  # DDP ranks for the training passes (distill, qat)

    def __post_init__(self):
        _at_least(self, ("calib_seq_len", "eval_seq_len", "eval_tokens", "nproc"), 1)


@dataclass(frozen=True)
class ExportSettings:
    formats: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # exported only where their toolkit imports (FormatSpec.toolkit)
    precision: str = "fp32"  # float weights (or "device": see float_precision); quantized checkpoints keep their codes
    max_seq_len: int | None = None
    fuse: bool = True
    exact: bool = False  # executorch: codes outside XNNPACK's int4 range kept by an extra plane, not clamped
    portable_embedding: bool = False  # executorch: quantized embedding in portable ops, not the quantized kernels


@dataclass(frozen=True)
class Target:
    device: str = "local"
    uri: str | None = None  # transport to a remote device (ssh://..., adb://...); None: local or not reachable
    bench: bool = True
    prompt_len: int = 128
    gen_len: int = 128
    repeat: int = 5

    def __post_init__(self):
        _at_least(self, ("prompt_len", "gen_len", "repeat"), 1)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    source: Source = field(default_factory=Source)
    passes: tuple = ()  # pass configs (toolchain.compress classes)
    compress: CompressSettings = field(default_factory=CompressSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    target: Target = field(default_factory=Target)
    document: dict = field(default_factory=dict, compare=False)  # the TOML document after overrides
    origin: str = ""  # the file it came from

    @property
    def data(self) -> str:
        """The corpus the passes calibrate and evaluate on."""
        if self.compress.data is not None:
            return self.compress.data
        return self.source.train.data if self.source.train is not None else "stdlib"


def _at_least(cfg, names: tuple[str, ...], low: int) -> None:
    for name in names:
        if getattr(cfg, name) < low:
            raise EdgesmithError(f"{name}={getattr(cfg, name)!r} must be an integer >= {low}")


# ----------------------------------------------------------------------------- loading


def list_recipes() -> list[tuple[str, str]]:
    """Bundled recipes: (name, description), sorted by name."""
    out = []
    for p in sorted(BUNDLED.glob("*.toml")):
        doc = _read_toml(p)
        out.append((p.stem, str(doc.get("description", ""))))
    return out


def recipe_path(path_or_name: str | Path) -> Path:
    p = Path(path_or_name)
    if p.suffix == ".toml" or p.is_file():
        if not p.is_file():
            raise EdgesmithError(f"{p}: no such recipe file")
        return p
    bundled = BUNDLED / f"{path_or_name}.toml"
    if not bundled.is_file():
        names = ", ".join(n for n, _ in list_recipes())
        raise EdgesmithError(f"recipe {str(path_or_name)!r}: not a file and not a bundled recipe; bundled: {names}")
    return bundled


def load_recipe(path_or_name: str | Path = "demo", overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe file (or a bundled name), apply `KEY=VALUE` overrides, validate everything."""
    path = recipe_path(path_or_name)
    doc = _read_toml(path)
    for text in overrides:
        apply_override(doc, text)
    return parse_recipe(doc, origin=str(path))


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise EdgesmithError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise EdgesmithError(f"{path}: not UTF-8 text ({e})") from None


_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")


def apply_override(doc: dict, text: str) -> None:
    """`source.train.steps=20`, `pass[0].bits=8`, `export.formats=["gguf"]`, `target.device=pixel-8`.

    VALUE is read as a TOML value; when it is not one (a bare word), as a string."""
    key, eq, raw = text.partition("=")
    key = key.strip()
    if not eq or not key:
        raise EdgesmithError(f"--set {text!r}: expected KEY=VALUE, e.g. source.train.steps=20")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    node, parts = doc, key.split(".")
    for i, part in enumerate(parts):
        m = _SEGMENT.match(part)
        if not m:
            raise EdgesmithError(f"--set {text!r}: {part!r} is not a key (letters, digits, _ and an optional [N])")
        name, index = m.group(1), m.group(2)
        last = i == len(parts) - 1
        if index is not None:
            items = node.get(name)
            if not isinstance(items, list) or int(index) >= len(items):
                have = len(items) if isinstance(items, list) else 0
                raise EdgesmithError(f"--set {text!r}: {name}[{index}] does not exist (the recipe has {have})")
            if last:
                items[int(index)] = value
                return
            node = items[int(index)]
        elif last:
            node[name] = value
        else:
            node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise EdgesmithError(f"--set {text!r}: {'.'.join(parts[:i + 1])} is not a table")


# ----------------------------------------------------------------------------- validation


def parse_recipe(doc: dict, origin: str = "") -> Recipe:
    doc = _copy(doc)
    top = {"name", "description", "source", "pass", "compress", "export", "target"}
    _no_unknown(doc, top, "")
    name = _typed(doc.get("name"), str, "name") if "name" in doc else Path(origin).stem or "run"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise EdgesmithError(f"name: {name!r} must be letters, digits, '.', '_' or '-' (it names the run directory)")
    description = _typed(doc.get("description", ""), str, "description")
    source = _source(_table(doc, "source"))
    passes = doc.get("pass", [])
    if not isinstance(passes, list):
        raise EdgesmithError("pass: expected an array of tables ([[pass]]), got " + _tname(passes))
    configs = tuple(pass_table(p, f"pass[{i}]") for i, p in enumerate(passes))
    compress = build(CompressSettings, _table(doc, "compress"), "compress")
    target = build(Target, _table(doc, "target"), "target")
    profile = _profile(target, _table(doc, "export"))
    export = _export(_table(doc, "export"), profile)
    _check_passes_for_device(configs, profile)
    return Recipe(name=name, description=description, source=source, passes=configs, compress=compress,
                  export=export, target=target, document=doc, origin=origin)


def _copy(doc):
    if isinstance(doc, dict):
        return {k: _copy(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_copy(v) for v in doc]
    return doc


def _tname(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def _table(doc: dict, key: str, path: str | None = None) -> dict:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        raise EdgesmithError(f"{path or key}: expected a table, got {_tname(v)}")
    return v


def _no_unknown(table: dict, allowed: set[str], path: str) -> None:
    for key in table:
        if key not in allowed:
            where = f"{path}.{key}" if path else key
            raise EdgesmithError(f"{where}: unknown key; allowed: {', '.join(sorted(allowed))}")


def _source(t: dict) -> Source:
    _no_unknown(t, {"checkpoint", "train"}, "source")
    if ("checkpoint" in t) == ("train" in t):
        raise EdgesmithError("source: give exactly one of source.checkpoint = \"DIR\" or a [source.train] table")
    if "checkpoint" in t:
        return Source(checkpoint=_typed(t["checkpoint"], str, "source.checkpoint"))
    tt = dict(_table(t, "train", "source.train"))
    train_keys = {f.name for f in fields(TrainConfig)}
    own = {k: tt.pop(k) for k in list(tt) if k not in train_keys}
    _no_unknown(own, {f.name for f in fields(TrainSource)} - {"train"} | train_keys, "source.train")
    cfg = build(TrainConfig, tt, "source.train")
    return Source(train=build(TrainSource, {**own, "train": cfg}, "source.train"))


def pass_table(p, path: str):
    """A recipe's `[[pass]]` table (at key path `path`) -> that pass's validated config."""
    if not isinstance(p, dict):
        raise EdgesmithError(f"{path}: expected a table, got {_tname(p)}")
    p = dict(p)
    kind = p.pop("kind", None)
    if kind is None:
        raise EdgesmithError(f"{path}.kind: missing; allowed: {', '.join(pass_kinds())}")
    if kind not in pass_kinds():
        raise EdgesmithError(f"{path}.kind: {kind!r} is not one of {', '.join(pass_kinds())}")
    if kind != QUANTIZE:
        return build(PASSES.get(kind).config, p, path)
    method = p.pop("method", None)
    if method not in METHODS.names():
        got = "missing" if method is None else f"{method!r} is not one of"
        raise EdgesmithError(f"{path}.method: {got} {', '.join(METHODS.names())}".replace("missing ", "missing; allowed: "))
    return build(METHODS.get(method).config, p, path)


def _profile(target: Target, export: dict):
    """The target's device profile; None for `local` unless the export table asks for the device's
    formats (the local profile is measured once, then cached)."""
    if target.device == "local" and DEVICE_FORMATS != export.get("formats"):
        return None
    try:
        return load_profile(target.device)
    except EdgesmithError as e:
        raise EdgesmithError(f"target.device: {e}") from None


def _export(t: dict, profile) -> ExportSettings:
    t = dict(t)
    if t.get("formats") == DEVICE_FORMATS:
        t["formats"] = _device_formats(profile)
    s = build(ExportSettings, t, "export")
    for key in ("formats", "optional"):
        for i, f in enumerate(getattr(s, key)):
            if f not in FORMATS.names():
                raise EdgesmithError(f"export.{key}[{i}]: unknown format {f!r}; allowed: {', '.join(FORMATS.names())}")
    if len(set(s.formats + s.optional)) != len(s.formats + s.optional):
        raise EdgesmithError("export.formats: a format is listed twice (formats and optional together)")
    if s.precision not in PRECISIONS + (DEVICE_FORMATS,):
        raise EdgesmithError(f"export.precision: {s.precision!r} is not one of {', '.join(PRECISIONS)}, device")
    if s.max_seq_len is not None and s.max_seq_len < 64:
        raise EdgesmithError(f"export.max_seq_len: {s.max_seq_len} is too short for the parity check (64 positions)")
    return s


def _device_formats(profile) -> list[str]:
    picked = [f for f in profile.formats if f in FORMATS.names()]
    if not picked:
        raise EdgesmithError(f"export.formats: device {profile.name} lists no format edgesmith exports "
                             f"({', '.join(profile.formats) or 'none'})")
    return picked


def float_precision(recipe: Recipe, quantized: bool) -> str:
    """export.precision, with "device" resolved: fp16 for a float model on a device that runs fp16;
    fp32 otherwise (a quantized model keeps its codes; only norms stay float, and ExecuTorch's
    XNNPACK quantized path takes fp32 only)."""
    if recipe.export.precision != DEVICE_FORMATS:
        return recipe.export.precision
    return "fp16" if not quantized and "fp16" in load_profile(recipe.target.device).precisions else "fp32"


def _check_passes_for_device(configs: tuple, profile) -> None:
    """A quantize / qat pass at a width the device profile does not run is refused, naming the pass (5 bits, GGUF's
    Q5_0, runs where 4-bit weights do: the same int8 dot products)."""
    if profile is None or not getattr(profile, "precisions", None):
        return
    for i, cfg in enumerate(configs):
        bits = getattr(cfg, "bits", None)
        if bits is not None and f"int{4 if bits == 5 else bits}" not in profile.precisions:
            raise EdgesmithError(f"pass[{i}].bits: int{bits} is not a precision of device {profile.name}; "
                                 f"allowed: {', '.join(profile.precisions)}")


# ----------------------------------------------------------------------------- dataclasses from tables


def build(cls: type, table: dict, path: str):
    """`cls(**table)` with unknown keys, types and the config's own checks reported at `path.key`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    _no_unknown(table, set(names), path)
    kwargs = {k: _typed(v, hints[k], f"{path}.{k}") for k, v in table.items()}
    try:
        return cls(**kwargs)
    except EdgesmithError as e:
        raise EdgesmithError(_blame(str(e), list(kwargs), path)) from None


def _blame(msg: str, keys: list[str], path: str) -> str:
    """Re-word a config's own error to start with the key path it is about."""
    best = None
    for k in keys:
        for pat in (rf"(?<![\w-]){re.escape(k)}=", rf"--{re.escape(k.replace('_', '-'))}: "):
            m = re.search(pat, msg)
            if m and (best is None or m.start() < best[1].start()):
                best = (k, m)
    if best is None:
        return f"{path}: {msg}"
    k, m = best
    return f"{path}.{k}: {msg[m.end():]}"


def _typed(value, hint, path: str):
    """Check a TOML value against a dataclass field annotation; arrays become tuples."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in options:
        return None
    for opt in options:
        base = typing.get_origin(opt) or opt
        if base is bool and isinstance(value, bool):
            return value
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if base is str and isinstance(value, str):
            return value
        if base is tuple and isinstance(value, list):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if dataclasses.is_dataclass(base) and isinstance(value, base):
            return value
    want = " or ".join(_want(o) for o in options if o is not type(None))
    raise EdgesmithError(f"{path}: expected {want}, got {_tname(value)} {value!r}")


def _want(hint) -> str:
    base = typing.get_origin(hint) or hint
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "an array"}.get(base, getattr(base, "__name__", str(base)))


# ----------------------------------------------------------------------------- writing


def to_toml(doc: dict) -> str:
    """A TOML document (the resolved recipe) from plain dicts/lists/scalars; tables after scalars."""
    lines: list[str] = []
    _emit(doc, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit(table: dict, prefix: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not _is_table(v) and not _is_table_array(v)}
    for k, v in scalars.items():
        lines.append(f"{_key(k)} = {_value(v)}")
    for k, v in table.items():
        if _is_table(v):
            lines += ["", f"[{'.'.join(_key(p) for p in prefix + [k])}]"]
            _emit(v, prefix + [k], lines)
        elif _is_table_array(v):
            for item in v:
                lines += ["", f"[[{'.'.join(_key(p) for p in prefix + [k])}]]"]
                _emit(item, prefix + [k], lines)


def _is_table(v) -> bool:
    return isinstance(v, dict)


def _is_table_array(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _value(k)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise EdgesmithError(f"cannot write {v!r} to TOML")
