"""`cose`: one sub-command per pipeline stage, plus data, log and ui."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cose.config import ConfigError

STAGES = ("validate", "train", "explain", "compile")


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml",
                   help="params file (params.yaml or a preset such as params/paper/cifar10.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE",
                   help="override a param with a dotted key, e.g. -S explain.images=4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cose",
        description="COSE: consistency-sensitivity evaluation of saliency methods. "
                    "Stages run in the order validate -> train -> explain -> compile "
                    "(`dvc repro` runs them all).",
    )
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO (default), WARNING")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="datasets: fetch NAME materialises data/NAME")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = dsub.add_parser("fetch", help="download/export a dataset into data/NAME with a manifest")
    fetch.add_argument("name", help="dataset name (digits is embedded; see `cose data list`)")
    fetch.add_argument("--root", default="data", help="data folder (default: data)")
    dsub.add_parser("list", help="list the dataset names")

    helps = {
        "validate": "check dataset manifests and files with great-expectations",
        "train": "train each (dataset, model) and save the checkpoints COSE needs",
        "explain": "compute the per-pair tables (maps of every variant, SSIM, Spearman)",
        "compile": "per-pair tables -> results/ (COSE table, summary, metrics)",
    }
    for stage in STAGES:
        p = sub.add_parser(stage, help=helps[stage], description=helps[stage])
        _add_params(p)
        if stage == "explain":
            p.add_argument("--backend", choices=("local", "ray"), default=None,
                           help="executor for work units (default: $COSE_BACKEND or local)")
        if stage == "compile":
            p.add_argument("--reference-outputs", metavar="DIR", default=None,
                           help="compile result CSVs in the reference code's layout "
                                "(outputs/<method>/<dataset>/<model>/results_*.csv) instead")
            p.add_argument("--out", default=None, help="output folder with --reference-outputs")

    sub.add_parser("log", help="replay MLflow logs left pending by a tracking outage")
    rem = sub.add_parser(
        "remote", help="DVC remotes: `check [NAME]` tests endpoint, credentials and bucket"
    )
    rsub = rem.add_subparsers(dest="remote_command", required=True, metavar="ACTION")
    rchk = rsub.add_parser(
        "check", help="one cheap request with the remote's DVC settings; one-line error naming it"
    )
    rchk.add_argument("name", nargs="?", default=None,
                      help="remote name (default: the DVC default remote)")
    ui = sub.add_parser("ui", help="MLflow UI on the project store (mlruns/)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1")
    return parser


def _load(args: argparse.Namespace):
    from cose import config

    return config.load(args.params, args.overrides)


def _run(args: argparse.Namespace) -> int:
    from cose.stages import common

    if args.quiet:
        os.environ["COSE_QUIET"] = "1"
    common.setup_logging(args.log_level or ("WARNING" if args.quiet else None))

    if args.command == "data":
        from cose import data

        if args.data_command == "list":
            print("\n".join(data.names()))
            return 0
        if args.name not in data.names():
            raise ConfigError(
                f"dataset: unknown value {args.name!r}; allowed: {', '.join(data.names())}"
            )
        path = data.fetch(args.name, root=args.root)
        print(f"{args.name}: {path}")
        return 0
    if args.command == "log":
        from cose.tracking import replay_pending

        pushed, failed = replay_pending()
        print(f"replayed {pushed} pending log(s); {failed} still pending")
        return 1 if failed else 0
    if args.command == "ui":
        from cose.tracking import artifact_root, tracking_uri

        (Path.cwd() / "mlruns").mkdir(exist_ok=True)
        cmd = ["mlflow", "ui", "--backend-store-uri", tracking_uri(),
               "--default-artifact-root", artifact_root(), "--host", args.host,
               "--port", str(args.port)]
        os.execvp(cmd[0], cmd)
    if args.command == "compile" and args.reference_outputs:
        from cose import scoring

        out = Path(args.out or "results")
        summary = scoring.compile_reference_outputs(args.reference_outputs)
        scoring.write_summary(summary, out)
        print(scoring.paper_table_markdown(summary))
        return 0

    if args.command == "remote":
        from cose.remote import check_remote, default_remote

        name = args.name or default_remote()
        check_remote(name)
        print(f"remote {name!r}: ok")
        return 0

    cfg = _load(args)
    if args.command in ("validate", "train", "explain"):
        for dataset in cfg.datasets:  # fail before any work starts
            common.data_dir(cfg, dataset)
    if args.command == "validate":
        from cose.stages import validate

        validate.run(cfg)
    elif args.command == "train":
        from cose.stages import train

        train.run(cfg)
    elif args.command == "explain":
        from cose.stages import explain

        explain.run(cfg, backend=args.backend)
    elif args.command == "compile":
        from cose.stages import compile as compile_stage

        compile_stage.run(cfg)
        print((common.RESULTS / "cose_table.md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"cose: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        if os.environ.get("COSE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        rest = "\n".join(str(exc).splitlines()[1:])
        print(f"cose: error: {first}", file=sys.stderr)
        if rest:
            print(rest, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
