"""`fewstep-search dashboard RUN_DIR [--port P] [--host 127.0.0.1]`: a search's trials in optuna-dashboard.

Serves the run's Optuna record (found through RUN_DIR/optuna.json, else RUN_DIR/optuna.db) with
`optuna-dashboard` on 127.0.0.1 unless told otherwise, prints the address, and runs until interrupted
(Ctrl-C). A record kept in a database server is opened with `--storage URL` (its password is never written to
the run directory). Needs the `optuna-dashboard` package (`pip install optuna-dashboard`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "dashboard",
        help="serve a run's Optuna record with optuna-dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `search` or `run`"
    )
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the run directory's record)")
    p.set_defaults(handler=run)


def storage_url(run_dir: Path, storage: str | None) -> str:
    """The storage to serve: `--storage`, else the one the run recorded, else RUN_DIR/optuna.db."""
    from fewstep_search.phase1.record import sqlite_url
    from fewstep_search.rundir import RunDir

    if storage:
        return storage
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    info = RunDir(run_dir).record_location()
    if info is not None and not info["storage"].startswith("sqlite:"):
        return str(info["storage"])
    db = run_dir / "optuna.db"
    if info is not None:
        db = Path(info["storage"].removeprefix("sqlite:///"))
    if not db.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no Optuna record ({db} is missing); run `fewstep-search search` first"
        )
    return sqlite_url(db)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    url = storage_url(args.run_dir, args.storage)
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise RuntimeError("the dashboard needs optuna-dashboard: pip install optuna-dashboard") from None
    print(f"optuna-dashboard for {url} at http://{args.host}:{args.port}/ (Ctrl-C to stop)", flush=True)
    run_server(url, host=args.host, port=args.port)
    return 0
