"""`cose`: one sub-command per pipeline stage, plus data, report, evaluate, log and ui."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from cose import runtime, spec
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
    fetch.add_argument("--force", action="store_true",
                       help="rebuild data/NAME even where it exists (its source changed, or a "
                            "file of it is damaged)")
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
        if stage == "train":
            p.add_argument("--dvc-stage", action="store_true",
                           help="train the one (dataset, model) that DVC names in $DVC_STAGE "
                                "(dvc.yaml: no param value passes through the shell)")
        if stage == "explain":
            p.add_argument("--backend", choices=("local", "ray"), default=None,
                           help="executor for work units (default: $COSE_BACKEND or local)")
        if stage == "compile":
            p.add_argument("--reference-outputs", metavar="DIR", default=None,
                           help="compile result CSVs in the reference code's layout "
                                "(outputs/<method>/<dataset>/<model>/results_*.csv) instead")
            p.add_argument("--out", default=None, help="output folder with --reference-outputs")
            p.add_argument("--nan", choices=("skip", "reference"), default=None,
                           help="NaN similarities: skip (leave them out of the means and count "
                                "them) or reference (plain means: one NaN makes the metric NaN, "
                                "as the reference's compile); default: compile.nan (skip)")
            p.add_argument("--files", choices=("reference", "all"), default="reference",
                           help="with --reference-outputs: only the file the reference's "
                                "compile reads per folder (results_0_500.csv / results_0_50.csv, "
                                "default; others are named in a warning) or every results_*.csv")

    rep = sub.add_parser(
        "report", help="rebuild results/report.html, figures and plot data from the per-pair "
                       "tables (no MLflow, no metrics)",
        description="Rebuild the report (report.html, cose_table.html, figures/*.png, "
                    "plots/magnitude/*.csv) from outputs/explain, as `cose compile` writes it.")
    _add_params(rep)
    rep.add_argument("--out", default="results", help="output folder (default: results)")
    rep.add_argument("--reference-outputs", metavar="DIR", default=None,
                     help="report on result CSVs in the reference code's layout instead")

    ev = sub.add_parser(
        "evaluate", help="COSE of one model's weights on an image folder; prints the table",
        description="COSE of a registry model with your weights on an image folder or a "
                    "fetched dataset folder, without DVC or MLflow (the Python twin is "
                    "cose.evaluate). Prints consistency, sensitivity and COSE per method.")
    ev.add_argument("--model", required=True,
                    help="a registry model name (plugins' included), a timm architecture name, "
                         "module:factory (a callable returning the nn.Module, given the class "
                         "count), or a TorchScript file")
    ev.add_argument("--weights", default=None, metavar="FILE",
                    help="a COSE checkpoint (checkpoints/<dataset>/<model>/final.pt) or a state "
                         "dict trained on DIR's classes (not for TorchScript, which holds its "
                         "own); without it the model is random-init")
    ev.add_argument("--num-classes", type=int, default=None,
                    help="the model's class count (default: the checkpoint's, else DIR's); it "
                         "must match the data and the checkpoint")
    ev.add_argument("--size", type=int, default=224,
                    help="input side for a model outside the registry: resize and centre-crop "
                         "(default 224; registry models use their own)")
    ev.add_argument("--data", required=True, metavar="DIR",
                    help="DIR/manifest.csv (a fetched dataset), DIR/<split>/<class>/* or "
                         "DIR/<class>/* (every image)")
    ev.add_argument("--split", default="test", help="split to evaluate (default: test)")
    ev.add_argument("--images", type=int, default=16,
                    help="images: the first N of a seeded permutation (default 16)")
    ev.add_argument("--methods", default=",".join(("gradcam", "gradcampp", "ig")),
                    help="comma-separated saliency methods, or 'all' (default: gradcam,"
                         "gradcampp,ig)")
    ev.add_argument("--transforms", default=None,
                    help="comma-separated COSE transforms (default: all 13)")
    ev.add_argument("--magnitudes", type=int, default=6,
                    help="magnitudes drawn per image and signed transform (default 6, the "
                         "paper's; the demo's params.yaml lowers explain.magnitudes to 3 to fit "
                         "a 2-core CPU)")
    ev.add_argument("--seed", type=int, default=0, help="image selection and magnitude draws")
    ev.add_argument("--batch-size", type=int, default=64, help="images per model call")
    ev.add_argument("--setting", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="saliency setting, e.g. --setting ig.steps=50 (repeatable)")
    ev.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                    help="an intermediate checkpoint for the mid-training sensitivity "
                         "(repeatable)")
    ev.add_argument("--no-random-model", action="store_true",
                    help="skip the random-init model variant")
    ev.add_argument("--precision", default="auto",
                    choices=spec.PRECISION_CHOICES,
                    help="of the saliency passes (default auto: per method the fastest "
                         "validated, else fp32; docs/gpu.md)")
    ev.add_argument("--bootstrap", type=int, default=1000,
                    help="resamples of the images behind each interval (default 1000; 0: none)")
    ev.add_argument("--out", default=None, metavar="DIR",
                    help="also write pairs.parquet, summary.csv and report.html into DIR")

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
    ui = sub.add_parser("ui", help="MLflow UI on the project store (mlruns/); prints the page "
                                   "of the COSE table")
    _add_params(ui)
    ui.add_argument("--port", type=int, default=5000,
                    help="port of the UI (default 5000: http://127.0.0.1:5000)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 "
                         "opens it to the network without a login)")
    return parser


def _leaf_parser(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The parser of the (sub-)command ``args`` ran: its usage is the one to show."""
    for dest in ("command", "data_command", "remote_command"):
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, dest, None)
        if not actions or name not in actions[0].choices:
            break
        parser = actions[0].choices[name]
    return parser


def _load(args: argparse.Namespace):
    from cose import config

    return config.load(args.params, args.overrides)


def _matrix_item(cfg, stage: str, addressing: str):
    """``cfg`` narrowed to the matrix item of dvc.yaml's ``stage`` that DVC runs now: DVC
    names it in ``DVC_STAGE`` (``train@digits-demo_resnet``, after ``path/dvc.yaml:`` in a
    subfolder), so dvc.yaml's commands hold no param value for a shell to interpret. The item
    is looked up among the validated names of ``cfg`` (identifiers: no ``-`` in them)."""
    import dataclasses

    name = addressing.rpartition(":")[2]
    items = {f"{d}-{m}": (d, m) for d in cfg.datasets for m in cfg.models}
    group, _, key = name.partition("@")
    if group != stage or key not in items:
        shown = f"{addressing!r}" if addressing else "unset"
        raise ConfigError(f"--dvc-stage: DVC_STAGE is {shown}, expected {stage}@<item> with an "
                          f"item of params.yaml ({', '.join(items)}); it is set by `dvc repro`")
    dataset, model = items[key]
    return dataclasses.replace(cfg, datasets=(dataset,), models=(model,))


def _run(args: argparse.Namespace) -> int:
    from cose.stages import common

    if args.quiet:
        runtime.set_quiet()
    common.setup_logging(args.log_level or ("WARNING" if args.quiet else None))
    from cose import plugins

    plugins.load()  # plugins/*.py and the cose.plugins entry points, before params are read

    if args.command == "data":
        from cose import data

        if args.data_command == "list":
            print("\n".join(data.names()))
            return 0
        if args.name not in data.names():
            raise ConfigError(
                f"dataset: unknown value {args.name!r}; allowed: {', '.join(data.names())}"
            )
        path = data.fetch(args.name, root=args.root, force=args.force)
        print(f"{args.name}: {path}")
        return 0
    if args.command == "log":
        from cose.tracking import relocate_store, replay_pending

        relocate_store()
        pushed, failed = replay_pending()
        print(f"replayed {pushed} pending log(s); {failed} still pending")
        return 1 if failed else 0
    if args.command == "ui":
        from cose.tracking import artifact_root, experiment_id, relocate_store, tracking_uri, ui_url

        (Path.cwd() / "mlruns").mkdir(exist_ok=True)
        relocate_store()  # a moved checkout shows its own artifacts
        name = _load(args).tracking.experiment if Path(args.params).is_file() else "cose"
        exp = experiment_id(name)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # browsable
        base = f"http://{shown}:{args.port}"
        if exp is None:
            print(f"MLflow UI: {base} (no COSE runs yet: run `dvc repro` or `cose compile`)")
        else:
            print(f"COSE per cell, with its interval: {ui_url(base, exp)}\n"
                  f"the same as charts: {ui_url(base, exp, charts=True)}")
        sys.stdout.flush()  # before mlflow takes the process over
        # mlflow of this interpreter: found where `cose` is, also outside an activated venv
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
               "--default-artifact-root", artifact_root(), "--host", args.host,
               "--port", str(args.port)]
        os.execv(cmd[0], cmd)
    if args.command == "compile" and args.reference_outputs:
        from cose import scoring

        out = Path(args.out or "results")
        from cose import uncertainty
        from cose.config import CompileConfig

        c = _load(args).compile if Path(args.params).exists() else CompileConfig()
        nan = args.nan or c.nan
        pairs = scoring.read_reference_outputs(args.reference_outputs, files=args.files)
        summary, reps = uncertainty.summarize(pairs, nan=nan, bootstrap=c.bootstrap,
                                              level=c.level, nan_share=c.nan_share)
        for line in uncertainty.warnings_for(summary):
            print(f"cose: warning: {line}", file=sys.stderr)
        means = uncertainty.method_means(summary, reps, c.level) if c.bootstrap else None
        paths = scoring.write_summary(summary, out, means=means)
        print(Path(paths.get("table1", paths["table"])).read_text())
        return 0

    if args.command == "remote":
        from cose.remote import check_remote, default_remote_source

        if args.name:
            check_remote(args.name)
            print(f"remote {args.name!r}: ok")
            return 0
        name, where = default_remote_source()
        why = f"the default remote, set in {where}"
        try:
            check_remote(name)
        except RuntimeError as exc:
            raise type(exc)(f"{exc} ({why})") from None
        print(f"remote {name!r}: ok ({why}; `dvc push` and `dvc pull` use it)")
        return 0

    if args.command == "evaluate":
        return _evaluate(args)

    cfg = _load(args)
    if getattr(args, "dvc_stage", False):
        cfg = _matrix_item(cfg, args.command, os.environ.get("DVC_STAGE", ""))
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
        if not os.environ.get("DVC_STAGE"):  # under `dvc repro` (make demo prints it after)
            print((common.RESULTS / "cose_table.md").read_text())
    elif args.command == "report":
        from cose.stages import compile as compile_stage

        out = Path(args.out)
        compile_stage.report_only(cfg, out, args.reference_outputs)
        print(out / "report.html")
    return 0


def _settings(items: list[str]) -> dict[str, dict]:
    import yaml

    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise ConfigError(f"--setting: {item!r}; expected METHOD.KEY=VALUE, e.g. ig.steps=50")
        out.setdefault(method.strip(), {})[name.strip()] = yaml.safe_load(value)
    return out


def _ckpt_tag(path: str) -> str:
    import re

    stem = Path(path).stem
    m = re.fullmatch(r"epoch_(\d+)", stem)
    tag = f"e{m.group(1)}" if m else re.sub(r"[^A-Za-z0-9]", "", stem)
    return tag or "ckpt"


@contextlib.contextmanager
def _bad_input():
    """Errors about what the user gave (a value, a file, a folder) are bad input: exit 2 with
    one line, as every command's (the stages' ConfigError)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, LookupError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError) as exc:
        text = str(exc).strip()
        raise ConfigError(text.splitlines()[0] if text else type(exc).__name__) from None


def _evaluate(args: argparse.Namespace) -> int:
    """`cose evaluate`: load the model and the images, run cose.evaluate, print the table."""
    with _bad_input():  # every argument checked before any map is computed
        inputs = _evaluate_inputs(args)
    return _evaluate_checked(args, *inputs)


def _evaluate_inputs(args: argparse.Namespace):
    from cose import api, models
    from cose.models import external
    from cose.stages import common

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    methods = "all" if methods == ["all"] else methods
    transforms = ([t.strip() for t in args.transforms.split(",") if t.strip()]
                  if args.transforms else None)
    settings = _settings(args.setting)
    for name in spec.methods() if methods == "all" else methods:
        spec.check_settings(name, settings.get(name, {}))  # the name, then its settings
    extra = sorted(set(settings) - set(spec.methods() if methods == "all" else methods))
    if extra:
        raise ConfigError(f"--setting {extra[0]}.*: {extra[0]!r} is not among --methods")
    for t in transforms or ():
        if t not in spec.TRANSFORMS:
            raise ConfigError(f"--transforms: unknown value {t!r}; allowed: "
                              f"{', '.join(spec.TRANSFORMS)}")
    for flag, value, low in (("--images", args.images, 1), ("--magnitudes", args.magnitudes, 1),
                             ("--batch-size", args.batch_size, 1),
                             ("--bootstrap", args.bootstrap, 0)):
        if value < low:
            raise ConfigError(f"{flag}: got {value}, expected >= {low}")
    registered = args.model in models.names()
    prep = (models.preprocess(args.model) if registered
            else models.PreprocessSpec(resize=args.size, crop=args.size))
    images, labels, ids, classes = api.load_folder(args.data, prep, split=args.split,
                                                   images=args.images, seed=args.seed)
    hub = args.weights is not None and (args.weights == "hub" or args.weights.startswith("hub:"))
    weights = args.weights if hub else external.read_weights(args.weights)
    in_ckpt = None if hub else external.checkpoint_classes(weights)
    nc = args.num_classes or in_ckpt or len(classes)
    if args.num_classes is not None and args.num_classes != len(classes):
        raise ConfigError(f"--num-classes {args.num_classes}, but {args.data} has "
                          f"{len(classes)} classes")
    if in_ckpt is not None and in_ckpt != nc:
        raise ConfigError(f"--weights {args.weights}: a {in_ckpt}-class checkpoint, but the model "
                          f"is asked for {nc} classes")
    if in_ckpt is not None and in_ckpt != len(classes):
        raise ConfigError(f"--weights {args.weights}: a {in_ckpt}-class checkpoint, but "
                          f"{args.data} has {len(classes)} classes")
    builder = external.resolve(args.model, nc)
    if weights is None and builder.kind != "torchscript":
        print(f"cose: warning: --model {args.model} without --weights: a random-init model",
              file=sys.stderr)
    dev = common.device()

    def build(w=None, seed=None):
        return builder.build(nc, weights=w, seed=seed).to(dev)

    model = build(weights, seed=args.seed)
    random_model = None
    if not args.no_random_model:
        if builder.can_randomize:
            random_model = build(seed=args.seed + 1)
        else:
            print("cose: warning: a TorchScript model has no random-init twin: no random-model "
                  "variant", file=sys.stderr)
    ckpts = {_ckpt_tag(p): build(external.read_weights(str(p))) for p in args.checkpoint}
    return (model, random_model, ckpts, images, labels, ids, methods, transforms, settings,
            registered, builder.name)


def _evaluate_checked(args: argparse.Namespace, model, random_model, ckpts, images, labels, ids,
                      methods, transforms, settings, registered: bool, model_name: str) -> int:
    from cose import api, scoring, uncertainty

    _check_some_correct(model, images, labels, args, registered)
    kwargs = {"transforms": transforms} if transforms else {}
    result = api.evaluate(
        model, images, labels, methods=methods,
        normalize=args.model if registered else "imagenet", random_model=random_model,
        checkpoints=ckpts, magnitudes=args.magnitudes, seed=args.seed,
        settings=settings, batch_size=args.batch_size, ids=ids,
        precision=args.precision,
        dataset=Path(args.data).resolve().name, model_name=model_name, **kwargs)

    table = result.intervals(bootstrap=args.bootstrap)
    rows = ["| method | consistency | sensitivity | COSE | COSE 95% interval | images | pairs | "
            "dropped (misclassified) |", "|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict("records"):
        pct = [("n/a" if r[k] != r[k] else f"{100 * r[k]:.2f}%")
               for k in ("overall_consistency", "sensitivity", "cose")]
        lo, hi = r.get("cose_lo", float("nan")), r.get("cose_hi", float("nan"))
        interval = "n/a" if lo != lo or hi != hi else f"[{100 * lo:.2f}, {100 * hi:.2f}]"
        rows.append(f"| {scoring.method_display(r['saliency_method'])} | {' | '.join(pct)} | "
                    f"{interval} | {r['n_images']} | {r['n_pairs']} | {r['n_misclassified']} |")
    for line in uncertainty.warnings_for(table):
        print(f"cose: warning: {line}", file=sys.stderr)
    first = result.pairs.groupby("test_idx")[["pred_class", "target_class"]].first()
    acc = float((first["pred_class"] == first["target_class"]).mean())
    print(f"{args.model} on {args.data} ({len(labels)} {args.split} images, accuracy "
          f"{100 * acc:.1f}%)")
    print("\n".join(rows))
    records = table.to_dict("records")
    for r in records:  # why a value is n/a, in words
        for what, reason in na_reasons(r, bootstrap=args.bootstrap):
            print(f"cose: note: {scoring.method_display(r['saliency_method'])}: {what} n/a: "
                  f"{reason}", file=sys.stderr)
    if args.out:
        result.save(args.out, title=f"COSE: {args.model} on {Path(args.data).name}")
        print(f"wrote {Path(args.out) / 'report.html'}")
    def nothing(r: dict) -> bool:  # neither a consistency nor a sensitivity to report
        return all(r[k] != r[k] for k in ("overall_consistency", "sensitivity"))

    if all(nothing(r) for r in records):
        print("cose: error: nothing could be scored (no consistency and no sensitivity for any "
              "method: see the notes above)", file=sys.stderr)
        return 1
    return 0


def na_reasons(r: dict, bootstrap: int = 1000) -> list[tuple[str, str]]:
    """(value, reason) for each n/a in one method's row of ``cose evaluate``'s table."""
    def missing(key: str) -> bool:
        v = r.get(key, float("nan"))
        return v != v

    out = []
    scored = r.get("n_pairs", 0) - r.get("n_misclassified", 0)
    if r.get("n_pairs", 0) and scored <= 0:
        return [("every value", "every original image is misclassified, so all its pairs are "
                                "dropped (COSE scores maps of correct predictions): give trained "
                                "weights (--weights) or more images (--images)")]
    if missing("overall_consistency"):
        out.append(("consistency", "no transformed image kept the model's prediction (no "
                                   "consistency pair)"))
    if missing("sensitivity"):
        out.append(("sensitivity", "no variant (transform, random model, checkpoint) changed the "
                                   "prediction (no fidelity pair): more images (--images) or a "
                                   "random-init variant (drop --no-random-model)"))
    if missing("cose") and not out:
        out.append(("COSE", "its similarities are NaN (constant maps or empty masks)"))
    if not missing("cose") and bootstrap and (missing("cose_lo") or missing("cose_hi")):
        out.append(("the COSE interval", f"{r.get('n_images', 0)} image(s) scored; an interval "
                                         "needs at least 2"))
    return out


def _check_some_correct(model, images, labels, args, registered: bool) -> None:
    """Stop before any map is computed when the model gets no image right: every pair would
    be dropped (minutes of work for a table of n/a)."""
    import torch

    from cose.api import _normalizer
    from cose.stages import common

    norm = _normalizer(args.model if registered else "imagenet")
    with torch.no_grad():
        preds = torch.cat([model(norm(chunk.to(common.device()))).argmax(1).cpu()
                           for chunk in images.split(max(args.batch_size, 1))])
    if not bool((preds == labels).any()):
        raise RuntimeError(
            f"--model {args.model} gets none of the {len(labels)} {args.split} images right, so "
            "every pair would be dropped (COSE scores maps of correct predictions): give trained "
            "weights (--weights) or more images (--images)")


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings as one `cose: warning: ...` line (no source location) on the command line."""
    return f"cose: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    from cose.tracking import redacted_output

    with redacted_output():  # our lines and every library's: no credential is printed
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    import warnings

    warnings.formatwarning = _warning_line
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `cose train --foo`: the train usage, not the top-level one
        _leaf_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        debug = runtime.current().debug or (args.log_level or "").upper() == "DEBUG"
    except ValueError as exc:  # a bad COSE_* value
        print(f"cose: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except ConfigError as exc:
        if debug:
            raise
        print(f"cose: error: {exc}{_undo_hint(args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cose: interrupted (finished outputs are kept; a rerun resumes)", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure is one line for the user
        if debug:
            raise
        text = str(exc).strip()
        expected = isinstance(exc, (OSError, ValueError, RuntimeError, LookupError))
        first = text.splitlines()[0] if text else type(exc).__name__
        if not expected or not text:  # an unexpected failure: say what it is, and how to see more
            first = f"{type(exc).__name__}: {first} (--log-level DEBUG shows the traceback)"
        print(f"cose: error: {_redact(first)}", file=sys.stderr)
        rest = "\n".join(text.splitlines()[1:])
        if rest and isinstance(exc, ValueError):  # a validation report's table
            print(_redact(rest), file=sys.stderr)
        return 1


def _undo_hint(args: argparse.Namespace) -> str:
    """Under DVC (``dvc repro``, ``dvc exp run -S``: DVC_STAGE is set), a refused value sits in
    the params file, where ``dvc exp run -S`` wrote it before any stage ran: say how to undo."""
    params = getattr(args, "params", None)
    if not os.environ.get("DVC_STAGE") or not params:
        return ""
    return (f" ({params} holds this value: `dvc exp run -S` writes it there before the stages "
            f"run; `git diff {params}` shows it, `git checkout -- {params}` undoes it)")


def _redact(text: str) -> str:
    from cose.tracking import redact

    return redact(text)


if __name__ == "__main__":
    sys.exit(main())
