"""The runtime option controls of the Playground and Benchmark tabs: threads, accuracy level, KV cache, flash attention.

Each control's "default" (or a blank threads field) leaves the option out, so the artifact's manifest
`runtime_options` apply: the configuration its export verified, as every user path runs it. A set value
becomes a `runtimes.load` keyword argument (`form_options`, parsed with the CLI's own `runtimes.options`,
so both accept the same values) or the `edgesmith bench` flag (`bench_flags`). Which backends have which
option is the backends' business (runtimes.options.check_flags names it in one line); this module only
turns form values into options. It builds widgets and parses values; it loads nothing.
"""

from __future__ import annotations

import argparse
import math

import gradio as gr

from models.errors import EdgesmithError
from runtimes.options import ACCURACY_LEVELS, FLAGS, check_flags, runtime_options

DEFAULT = "default"
ACCURACY_CHOICES = [DEFAULT, *map(str, ACCURACY_LEVELS)]
KV_CHOICES = [DEFAULT, "fp32", "fp16"]  # the CLI's --kv-cache spellings (runtimes.options maps them to llama.cpp's)
FLASH_CHOICES = [DEFAULT, "on", "off"]
FLASH = {"on": True, "off": False}


def controls(prefix: str) -> list:
    """The four widgets, in the order `form_options` takes their values (elem ids `<prefix>-threads`, ...)."""
    with gr.Row():
        threads = gr.Textbox("", label="Threads (blank: the artifact's policy)", max_lines=1,
                             elem_id=f"{prefix}-threads")
        accuracy = gr.Dropdown(ACCURACY_CHOICES, value=DEFAULT, label="Accuracy level (onnx int4/int8: 0 exact, "
                               "4 int8 activations; default: the manifest's)", elem_id=f"{prefix}-accuracy-level")
        kv_cache = gr.Dropdown(KV_CHOICES, value=DEFAULT, label="KV cache (gguf; default: the manifest's)",
                               elem_id=f"{prefix}-kv-cache")
        flash = gr.Dropdown(FLASH_CHOICES, value=DEFAULT, label="Flash attention (gguf; default: the manifest's)",
                            elem_id=f"{prefix}-flash-attn")
    return [threads, accuracy, kv_cache, flash]


def _set(value) -> str | None:
    text = "" if value is None else str(value).strip()
    return None if text in ("", DEFAULT) else text


def form_options(threads="", accuracy_level=DEFAULT, kv_cache=DEFAULT, flash_attn=DEFAULT) -> dict:
    """The controls' values as `runtimes.load` keyword arguments (unset ones left out); a bad value is one
    line naming the field."""
    args = argparse.Namespace(threads=None, accuracy_level=None, kv_cache=None, flash_attn=None)
    if (t := _set(threads)) is not None:
        try:
            x = float(t)
        except ValueError:
            raise EdgesmithError(f"threads: {t!r} is not a number (blank: the artifact's policy)") from None
        if not math.isfinite(x) or x != int(x) or x < 1:
            raise EdgesmithError(f"threads: {t!r} must be a whole number >= 1 (blank: the artifact's policy)")
        args.threads = int(x)
    if (a := _set(accuracy_level)) is not None:
        if a not in ACCURACY_CHOICES:
            raise EdgesmithError(f"accuracy level: {a!r}; allowed: {', '.join(ACCURACY_CHOICES)}")
        args.accuracy_level = int(a)
    if (k := _set(kv_cache)) is not None:
        if k not in KV_CHOICES:
            raise EdgesmithError(f"KV cache: {k!r}; allowed: {', '.join(KV_CHOICES)}")
        args.kv_cache = k
    if (f := _set(flash_attn)) is not None:
        if f not in FLASH:
            raise EdgesmithError(f"flash attention: {f!r}; allowed: {', '.join(FLASH_CHOICES)}")
        args.flash_attn = FLASH[f]
    return runtime_options(args)


def bench_flags(options: dict) -> list[str]:
    """`options` (from form_options) as `edgesmith bench` flags."""
    flags = []
    for key, value in options.items():
        flags += [FLAGS[key], ("on" if value else "off") if isinstance(value, bool) else str(value)]
    return flags


def per_model(paths: list, options: dict) -> list[dict]:
    """The options each model's backend has (side by side, an ONNX and a GGUF model each get theirs); an option
    that none of them has is refused in one line (runtimes.options.check_flags names the flags it takes)."""
    per = [{} for _ in paths]
    for key, value in options.items():
        refusal = None
        for i, path in enumerate(paths):
            try:
                check_flags(path, {key: value})
            except EdgesmithError as e:
                refusal = refusal or e
                continue
            per[i][key] = value
        if refusal is not None and not any(key in p for p in per):
            raise refusal
    return per
