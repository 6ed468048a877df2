"""`fewstep-search pretrain {digits,classifier}`: reproduce the shipped assets with a fixed seed on the CPU.

The built-in `digits` model and the metrics classifier ship inside the package; these commands retrain them from
scikit-learn's bundled 8x8 digits (no network), e.g. to check the cards in fewstep_search/assets/ or to try
other settings. Output goes to --out (default: a new folder, never over the shipped files unless asked).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="retrain a built-in asset (digits model or metrics classifier)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("asset", choices=["digits", "classifier"], help="which asset to train")
    p.add_argument("--out", type=Path, default=Path("runs/pretrain"), help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="digits: optimizer steps (default: the shipped recipe)")
    p.add_argument("--epochs", type=int, default=None, help="classifier: epochs (default: the shipped recipe)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (results are reproducible per setting)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from fewstep_search.pretrain import pretrain_classifier, pretrain_digits

    common = {"out_dir": args.out, "seed": args.seed, "threads": args.threads, "progress": not args.quiet}
    if args.asset == "digits":
        path = pretrain_digits(**common, **({"steps": args.steps} if args.steps else {}))
    else:
        path = pretrain_classifier(**common, **({"epochs": args.epochs} if args.epochs else {}))
    print(f"wrote {path} (and its JSON card beside it)")
    return 0
