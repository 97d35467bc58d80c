"""`edgesmith devices` (profiles and the planner) and `edgesmith bench` (time artifacts on a device)."""

from __future__ import annotations

import argparse

from tqdm import tqdm

from devices.bench import bench, format_table, plot_results, write_results
from devices import planner
from devices.profiles import list_profiles, load_profile
from devices.shapes import PUBLIC
from runtimes.options import add_runtime_options, runtime_options


def devices(args: argparse.Namespace) -> None:
    if args.devices_command == "list":
        for name in list_profiles():
            prof = load_profile(name) if name != "local" else None
            desc = prof.description if prof else "this machine (detected; bandwidth measured once, cached)"
            print(f"{name:<18} {(prof.kind if prof else 'desktop'):<8} {desc}")
    elif args.devices_command == "show":
        prof = load_profile(args.name)
        for key, value in prof.as_dict().items():
            print(f"{key:<20} {value}")
    else:
        print(planner.format_plan(planner.plan(args.device, args.model, context=args.context, bits=args.bits)))


def run_bench(args: argparse.Namespace) -> None:
    bars = []  # the bar starts with the first run: input refused before it is one line, with no bar above it

    def progress(done: int, total: int, label: str) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=f"bench on {args.device}", unit="artifact"))
        bars[0].n = done
        bars[0].set_postfix_str(label)
        bars[0].refresh()

    try:
        results = bench(args.artifacts, args.device, prompt_len=args.prompt_len, gen_len=args.gen_len,
                        repeat=args.repeat, timeout_s=args.timeout, progress=progress, options=runtime_options(args))
    finally:
        for bar in bars:
            bar.close()
    print(format_table(results))
    if args.json:
        out = write_results(results, args.json)
        png = plot_results(results, out.with_suffix(".png"))
        print(f"wrote {out} and {png}")


def register(sub) -> None:
    d = sub.add_parser("devices", help="device profiles and the memory / roofline planner")
    dsub = d.add_subparsers(dest="devices_command", required=True, metavar="SUBCOMMAND")
    dsub.add_parser("list", help="the bundled device profiles, and local")
    ds = dsub.add_parser("show", help="one profile's specs and sources")
    ds.add_argument("name", help="profile name, local, or a profile .toml")
    dp = dsub.add_parser("plan", help="does a model fit on a device, and its decode / prefill bounds")
    dp.add_argument("device", help="profile name, local, or a profile .toml")
    dp.add_argument("--model", required=True, help="checkpoint or artifact directory, nano/micro/small, or "
                    f"{', '.join(PUBLIC)}")
    dp.add_argument("--context", type=int, default=None, metavar="N", help="tokens in the KV cache (default: "
                    "the model's max_seq_len, at most 4096)")
    dp.add_argument("--bits", type=int, default=None, metavar="B", help="weight bits: 4, 5 (GGUF Q5_0), 8, 16 or 32 (default: "
                    "as stored when quantized, else the device's recommended precision)")
    d.set_defaults(func=devices)

    b = sub.add_parser("bench", help="time artifacts on a device (local, a profile, ssh:// or adb://)")
    b.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="exported artifact directories")
    b.add_argument("--device", default="local", help="local, a profile name, ssh://user@host[:port] or "
                   "adb://SERIAL (default local)")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens prefilled per run (default 128)")
    b.add_argument("--gen-len", type=int, default=128, help="tokens decoded per run (default 128)")
    b.add_argument("--repeat", type=int, default=5, help="runs per artifact; the median is reported (default 5)")
    b.add_argument("--timeout", type=float, default=600.0, metavar="S", help="seconds per device command")
    b.add_argument("--json", default=None, metavar="OUT", help="write the results here (and a plot next to it)")
    # Runtime (default: each artifact's manifest runtime_options, the configuration its export verified). A flag
    # applies to the artifacts whose backend has it (the table's options column shows what each row ran with);
    # one that no artifact has is refused.
    add_runtime_options(b)
    b.set_defaults(func=run_bench)
