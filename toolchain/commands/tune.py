"""`edgesmith tune`: per-layer precisions for a device, chosen on measured KLD and measured speed."""

from __future__ import annotations

import argparse
from pathlib import Path

from toolchain.report import text_table
from toolchain.tune import tune
from toolchain.tune.driver import METHODS
from toolchain.tune.report import COLUMNS, candidate_rows


def run(args: argparse.Namespace) -> None:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    doc = tune(args.checkpoint, args.target, args.out, max_size_mb=args.max_size_mb,
               min_decode_tok_s=args.min_decode_tok_s, max_kld=args.max_kld, formats=formats, method=args.method,
               budget_minutes=args.budget_minutes, candidates=args.candidates, seed=args.seed, data=args.data,
               drop_layers=args.drop_layers, heal_steps=args.heal_steps,
               calib_windows=args.calib_windows, eval_tokens=args.eval_tokens)
    print()
    print(text_table(COLUMNS, candidate_rows(doc)))
    best = next(r for r in doc["candidates"] if r["chosen"])
    out = Path(args.out)
    print(f"\nchosen: {best['label']} — {best['size_mb']:.3f} MB, mean KLD {best['kld_mean']:.4g}, same top p "
          f"{100 * best['same_top_p']:.2f} %, decode {best['decode_tok_s']:.1f} tok/s ({best['speed_source']})")
    print(f"checkpoint {out / 'best'}, recipe {out / 'recipe.toml'} (edgesmith run {out / 'recipe.toml'}), "
          f"report {out / 'report.html'}, every candidate in {out / 'pareto.json'}")


def register(sub) -> None:
    t = sub.add_parser("tune", help="choose per-layer precisions for a device on measured KLD, size and speed")
    t.add_argument("checkpoint", metavar="CKPT", help="the float checkpoint to quantize")
    t.add_argument("--target", required=True, metavar="DEVICE", help="device profile (local, a bundled name, or "
                   "a .toml); its bench measures speed, or its planner bound where it cannot be reached")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory (pareto.json, best/, "
                   "recipe.toml, report.html); a tune killed midway resumes from it")
    # Limits
    t.add_argument("--max-size-mb", type=float, default=None, help="largest artifact file (MB)")
    t.add_argument("--min-decode-tok-s", type=float, default=None, help="slowest acceptable decode (tok/s)")
    t.add_argument("--max-kld", type=float, default=None, help="largest acceptable mean KLD vs the float model")
    # Search
    t.add_argument("--formats", default=None, help="comma-separated export formats; the first is measured "
                   "(default: the device's preferred one)")
    t.add_argument("--method", default="gptq", choices=METHODS, help="quantization method (default gptq)")
    t.add_argument("--candidates", type=int, default=4, help="frontier points built and measured (default 4), "
                   "plus one measured refinement under --max-size-mb")
    t.add_argument("--drop-layers", type=int, default=0, metavar="N", help="structured pruning in the search: "
                   "up to N whole blocks may be removed, each priced by its measured KLD (default 0: none)")
    t.add_argument("--heal-steps", type=int, default=0, metavar="M", help="with --drop-layers: distill a candidate "
                   "that drops blocks M steps from the float model before quantizing it (default 0: no healing)")
    t.add_argument("--budget-minutes", type=float, default=None, help="stop building candidates after this long")
    t.add_argument("--seed", type=int, default=0, help="calibration windows seed (default 0)")
    t.add_argument("--data", default="stdlib", help="corpus: calibration from its train split, KLD on validation")
    t.add_argument("--calib-windows", type=int, default=16, help="calibration windows (default 16)")
    t.add_argument("--eval-tokens", type=int, default=16 * 1024, help="validation tokens KLD is measured on "
                   "(default 16384)")
    t.set_defaults(func=run)
