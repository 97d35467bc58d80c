"""Which distillation heals a dropped block: mean KLD against the float model after `prune:method=layers` alone and
after each distill setting, in torch on validation tokens (the settings tune's --heal-steps uses came from this).

    python scripts/bench_heal.py --checkpoint /tmp/micro-train/checkpoint --drop 1 --steps 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolchain.compress.driver import compress_checkpoint  # noqa: E402
from toolchain.compress.passes.distill import Distill  # noqa: E402
from toolchain.compress.passes.prune import Prune  # noqa: E402
from toolchain.tune.driver import heal_config  # noqa: E402

SETTINGS = {"unhealed": None,
            "distill defaults (T=2, lm_weight 0.5, lr 1e-3)": {},
            "KL only, T=1, lr 1e-3": {"temperature": 1.0, "lm_weight": 0.0},
            "tune's heal_config (KL only, T=1, lr 3e-4)": "heal"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--drop", type=int, default=1, help="the block removed")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    args = ap.parse_args()
    rows = []
    for label, kw in SETTINGS.items():
        passes = [Prune(method="layers", drop=(args.drop,))]
        if kw == "heal":
            passes.append(Distill(**heal_config(args.steps, 128), eval_tokens=4096))
        elif kw is not None:
            passes.append(Distill(steps=args.steps, eval_tokens=4096, **kw))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            q = compress_checkpoint(args.checkpoint, Path(tmp) / "c", passes, "stdlib", 128, 128, args.eval_tokens,
                                    0, force=True)["quality"]
        rows.append((label, q["kl"], q["top1"], q["perplexity"], time.perf_counter() - t0))
    print(f"\n{args.checkpoint}: layers.{args.drop} dropped, {args.steps} distill steps, KLD in torch on "
          f"{args.eval_tokens} validation tokens")
    print("| healing | mean KLD | same top p | perplexity | seconds |\n|---|---:|---:|---:|---:|")
    for label, kl, top1, ppl, s in rows:
        print(f"| {label} | {kl:.4f} | {100 * top1:.2f} % | {ppl:.2f} | {s:.0f} |")


if __name__ == "__main__":
    main()
