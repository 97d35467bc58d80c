"""Device profiles: what a device has (RAM, memory bandwidth, peak compute per precision) and how
to reach it, read from `devices/profiles/<name>.toml`, plus the `local` profile of this machine.

A profile TOML mirrors `DeviceProfile` with human units (`ram_gib`, `bandwidth_gb_s`,
`[peak_tflops]`); every spec carries a comment citing its source, and `sources` lists them.
`load_profile("local")` detects cores, RAM, OS and architecture and measures this machine's memory
bandwidth and fp32 matmul rate once (`devices.measure`), cached under `$EDGESMITH_CACHE/devices/`.
`load_profile` also accepts a path to a TOML file. This module plans and runs nothing.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from devices import measure
from models.confine import read_bytes
from models.errors import EdgesmithError
from runtimes.loader import artifact_formats
from runtimes.session import cpu_cores

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
KINDS = ("phone", "jetson", "sbc", "desktop")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
TRANSPORT_SCHEMES = ("local", "ssh://", "adb://")
GIB = 1 << 30

_REQUIRED = ("name", "kind", "os", "arch", "ram_gib", "bandwidth_gb_s", "peak_tflops", "formats", "precisions",
             "transport", "sources")
_OPTIONAL = ("description", "cores", "ram_budget_fraction", "native_runner", "executorch_runner", "python")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str
    os: str
    arch: str
    ram_bytes: int
    bandwidth_bytes_s: float
    peak_flops: dict[str, float]  # precision -> FLOP/s (OP/s for int precisions), dense
    formats: tuple[str, ...]  # preferred order
    precisions: tuple[str, ...]  # preferred order
    transport: str  # "local", "ssh://user@host[:port]" or "adb://SERIAL"
    native_runner: str | None = None  # llama.cpp's llama-bench on the device (adb bench)
    executorch_runner: str | None = None  # ExecuTorch's llama_main on the device (adb bench of a .pte)
    sources: tuple[str, ...] = ()
    description: str = ""
    cores: int | None = None
    ram_budget_fraction: float = 0.8  # share of RAM one process may use
    python: str = "python3"  # the device's Python (ssh bench)
    measured: dict = field(default_factory=dict)  # the local profile: how its figures were measured

    def __post_init__(self):
        where = f"device profile {self.name!r}"
        if self.kind not in KINDS:
            raise EdgesmithError(f"{where}: kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        for name in ("ram_bytes", "bandwidth_bytes_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise EdgesmithError(f"{where}: {name} {value!r} must be a positive number")
        if not self.peak_flops:
            raise EdgesmithError(f"{where}: peak_flops is empty (give at least one of {', '.join(PRECISIONS)})")
        for prec, value in self.peak_flops.items():
            if prec not in PRECISIONS:
                raise EdgesmithError(f"{where}: peak compute precision {prec!r}; allowed: {', '.join(PRECISIONS)}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise EdgesmithError(f"{where}: peak compute {prec} {value!r} must be a positive number")
        for name, allowed in (("formats", tuple(artifact_formats())), ("precisions", PRECISIONS)):
            values = getattr(self, name)
            if not values:
                raise EdgesmithError(f"{where}: {name} is empty; allowed: {', '.join(allowed)}")
            for v in values:
                if v not in allowed:
                    raise EdgesmithError(f"{where}: {name} entry {v!r}; allowed: {', '.join(allowed)}")
        if not (self.transport == "local" or self.transport.startswith(("ssh://", "adb://"))):
            raise EdgesmithError(f"{where}: transport {self.transport!r}; allowed: local, ssh://user@host[:port], "
                                 "adb://SERIAL")
        if not 0 < self.ram_budget_fraction <= 1:
            raise EdgesmithError(f"{where}: ram_budget_fraction {self.ram_budget_fraction!r} must be in (0, 1]")

    @property
    def ram_budget_bytes(self) -> int:
        return int(self.ram_bytes * self.ram_budget_fraction)

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "description": self.description, "os": self.os,
                "arch": self.arch, "cores": self.cores, "ram_bytes": self.ram_bytes,
                "ram_budget_fraction": self.ram_budget_fraction, "bandwidth_bytes_s": self.bandwidth_bytes_s,
                "peak_flops": dict(self.peak_flops), "formats": list(self.formats),
                "precisions": list(self.precisions), "transport": self.transport,
                "native_runner": self.native_runner, "executorch_runner": self.executorch_runner,
                "python": self.python, "sources": list(self.sources),
                "measured": dict(self.measured)}


# ----------------------------------------------------------------------------- TOML files


PROFILE_LIMIT = 1 << 20  # a profile is a page of TOML


def list_profiles() -> list[str]:
    """Names of the bundled profiles, plus `local`."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml")) + ["local"]


def load_profile(name: str) -> DeviceProfile:
    """A bundled profile by name, `local` (detected and measured), or a profile TOML by path."""
    if name == "local":
        return local_profile()
    path = Path(name)
    candidate = PROFILE_DIR / f"{name}.toml"
    try:
        given, known = path.suffix == ".toml" and path.is_file(), candidate.is_file()
    except (OSError, ValueError):  # a name too long for a path, or with a NUL
        given = known = False
    if given:
        return profile_from_toml(path)
    if not known:
        raise EdgesmithError(f"unknown device profile {name!r}; known: {', '.join(list_profiles())} "
                             "(or a path to a profile .toml)")
    return profile_from_toml(candidate)


def profile_from_toml(path: Path) -> DeviceProfile:
    try:
        d = tomllib.loads(read_bytes(path, PROFILE_LIMIT).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise EdgesmithError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgesmithError(f"{path}: not valid TOML ({e})") from None
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise EdgesmithError(f"{path}: missing field {missing[0]!r} (required: {', '.join(_REQUIRED)})")
    unknown = sorted(set(d) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise EdgesmithError(f"{path}: unknown field {unknown[0]!r}; allowed: {', '.join(_REQUIRED + _OPTIONAL)}")
    if not isinstance(d["peak_tflops"], dict):
        raise EdgesmithError(f"{path}: peak_tflops must be a table (precision = TFLOP/s)")
    for key in ("formats", "precisions", "sources"):
        if not isinstance(d[key], list) or not all(isinstance(v, str) for v in d[key]):
            raise EdgesmithError(f"{path}: {key} must be a list of strings")
    if not d["sources"]:
        raise EdgesmithError(f"{path}: sources is empty (cite where every spec comes from)")
    for key in ("ram_gib", "bandwidth_gb_s", "ram_budget_fraction"):
        value = d.get(key, 0.8)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise EdgesmithError(f"{path}: {key} {value!r} must be a positive finite number")
    for key in ("name", "kind", "os", "arch", "transport"):
        if not isinstance(d[key], str):
            raise EdgesmithError(f"{path}: {key} {d[key]!r} must be a string")
    for key in ("native_runner", "executorch_runner"):
        if key in d and not isinstance(d[key], str):
            raise EdgesmithError(f"{path}: {key} {d[key]!r} must be a string")
    tflops = {k: (v * 1e12 if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
              for k, v in d["peak_tflops"].items()}
    try:
        return DeviceProfile(
            name=d["name"], kind=d["kind"], os=d["os"], arch=d["arch"], ram_bytes=int(d["ram_gib"] * GIB),
            bandwidth_bytes_s=float(d["bandwidth_gb_s"]) * 1e9, peak_flops=tflops, formats=tuple(d["formats"]),
            precisions=tuple(d["precisions"]), transport=d["transport"], native_runner=d.get("native_runner"),
            executorch_runner=d.get("executorch_runner"), sources=tuple(d["sources"]), description=d.get("description", ""), cores=d.get("cores"),
            ram_budget_fraction=float(d.get("ram_budget_fraction", 0.8)), python=d.get("python", "python3"))
    except EdgesmithError as e:
        raise EdgesmithError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------- this machine


def cache_dir() -> Path:
    return Path(os.environ.get("EDGESMITH_CACHE", Path.home() / ".cache" / "edgesmith")) / "devices"


def ram_bytes() -> int:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_formats() -> tuple[str, ...]:
    """Formats this machine's Python can run (a TensorRT engine only where tensorrt imports)."""
    import importlib.util

    found = [fmt for fmt, module in (("gguf", "llama_cpp"), ("onnx", "onnxruntime"), ("executorch", "executorch"),
                                     ("tensorrt", "tensorrt")) if importlib.util.find_spec(module) is not None]
    return tuple(found) or ("onnx",)


def local_profile(refresh: bool = False) -> DeviceProfile:
    """This machine: cores, RAM, OS and arch detected; bandwidth and fp32 rate measured once and
    cached (keyed by host, CPU and core count, so a moved cache is measured again)."""
    cores = cpu_cores()
    key = f"{socket.gethostname()}|{platform.machine()}|{platform.processor()}|{cores}"
    path = cache_dir() / "local.json"
    measured = None
    if path.is_file() and not refresh:
        try:
            cached = json.loads(path.read_text())
            measured = cached if cached.get("key") == key else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            measured = None
    if measured is None:
        measured = {"key": key, "bandwidth_bytes_s": measure.measure_bandwidth(cores),
                    "fp32_flops": measure.measure_matmul_flops(cores), "threads": cores,
                    "method": "median of 5 multi-threaded torch sums over a 0.5 GiB fp32 tensor; "
                              "median of 5 fp32 1024x1024 matmuls"}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(measured, indent=2) + "\n")
        tmp.replace(path)
    arch = platform.machine().lower() or "unknown"
    return DeviceProfile(
        name="local", kind="desktop", os=platform.system().lower() or "unknown", arch=arch, ram_bytes=ram_bytes(),
        bandwidth_bytes_s=float(measured["bandwidth_bytes_s"]),
        peak_flops={"fp32": float(measured["fp32_flops"])}, formats=local_formats(),
        precisions=("int4", "int8", "fp16", "fp32"), transport="local", native_runner=None,
        sources=(f"measured on this machine, cached in {path}",), description=f"this machine ({socket.gethostname()})",
        cores=cores, ram_budget_fraction=0.8, measured=measured)
