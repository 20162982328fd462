"""`specialist-router classifier {train,eval,predict,reload}`: build, score and try the task classifier, and hot-swap
the one a running gateway uses.

Each command is `main_<name>(args) -> int`; errors a user can fix raise `core.errors.UserError`
subclasses, which the top-level CLI prints as one line (exit status 2). `eval` and `predict` without `--path` use
the data dir's current artifact, building the default one on first use (as `serve` does).
"""
from __future__ import annotations

import sys
from pathlib import Path

import classifier
from classifier.metrics import evaluate, format_report
from classifier.train import ClassifierTrainConfig, predict_file, train
from cli.output import echo, emit_json, err, json_command
from cli.remote import add_gateway_flags, client_from
from core import config, envs
from core.envs import CLASSIFIER_PREFIX
from core.errors import InvalidArgument


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("classifier", help="train, evaluate and try the task classifier",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="classifier_command", metavar="SUBCOMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a new artifact version from labeled JSONL and make it current")
    t.add_argument("--config", help=f"YAML file with any setting below (defaults < file < {CLASSIFIER_PREFIX}* < flags)")
    t.add_argument("--json", action="store_true", help="print only the artifact metadata as JSON on stdout")
    config.add_flags(t, ClassifierTrainConfig)
    config.add_hidden_alias(t, "--model", "model")  # deprecated spelling of --kind (--model is the base LLM)
    t.set_defaults(func=json_command(main_train))

    e = sub.add_parser("eval", help="accuracy, macro-F1, per-class scores, confusion and routing on labeled JSONL")
    e.add_argument("--data", type=Path, default=None, help="labeled JSONL; default: the held-out real set")
    e.add_argument("--path", type=Path, default=None, help="artifact (root or version folder); default: current")
    e.add_argument("--threshold", type=float, default=None, help="evaluate at this threshold instead of the artifact's")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=json_command(main_eval))

    q = sub.add_parser("predict", help="classify texts given as arguments, or one per line on stdin")
    q.add_argument("texts", nargs="*", help="texts; none: read lines from stdin")
    q.add_argument("--path", type=Path, default=None, help="artifact (root or version folder); default: current")
    q.add_argument("--json", action="store_true", help="one JSON object per text, one per line (JSON Lines)")
    q.set_defaults(func=json_command(main_predict))

    r = sub.add_parser("reload", help="gateway: load an artifact and swap it in with no dropped request")
    r.add_argument("--path", default=None, help="artifact (root or version folder) inside the gateway's classifier "
                                                "folder; default: the gateway's configured classifier")
    r.add_argument("--json", action="store_true", help="print the loaded version and tasks as JSON")
    add_gateway_flags(r)
    r.set_defaults(func=json_command(main_reload))


def _load(path: Path | None):
    """The artifact at `path`, or the current one in the data dir (the default is built on first use)."""
    return classifier.load(path) if path else classifier.load(classifier.ensure_default(log=err))


def main_train(args) -> int:
    envs.set_offline_defaults()
    cfg = config.load(ClassifierTrainConfig, config_file=args.config, env_prefix=CLASSIFIER_PREFIX,
                      overrides=config.overrides_from_args(args))
    res = train(cfg, log=echo(args))
    if args.json:
        emit_json(args, res.metadata)
    else:
        print(f"current classifier: {res.path}")
    return 0


def main_eval(args) -> int:
    envs.set_offline_defaults()
    clf = _load(args.path)
    data = args.data or classifier.heldout_path()
    ex, pred, conf = predict_file(clf, data)
    unknown = sorted(set(ex.labels) - set(clf.tasks))
    if unknown:
        raise InvalidArgument(f"{data} has labels {unknown} that classifier {clf.version} does not know ({clf.tasks})")
    thr = clf.threshold if args.threshold is None else float(args.threshold)
    m = evaluate(ex.labels, pred, conf, clf.tasks, thr)
    m.update(version=clf.version, kind=clf.kind, data=str(data))
    if args.json:
        emit_json(args, m)
    else:
        print(format_report(m, f"classifier {clf.version} ({clf.kind}) on {data}"))
    return 0


def main_predict(args) -> int:
    envs.set_offline_defaults()
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    clf = _load(args.path)
    for text, p in zip(texts, clf.predict_detailed(texts)):
        if args.json:
            emit_json(args, {"task": p.task, "confidence": round(p.confidence, 4), "abstained": p.abstained,
                             "truncated": p.truncated, "scores": {k: round(v, 4) for k, v in p.scores.items()}},
                      indent=None)
        else:
            flag = " (abstain: base model)" if p.abstained else ""
            print(f"{p.task}\t{p.confidence:.3f}{flag}\t{text[:60]!r}")
    return 0


def main_reload(args) -> int:
    with client_from(args) as c:
        info = c.reload_classifier(str(Path(args.path).expanduser().absolute()) if args.path else None,
                                   timeout=args.timeout)
    if args.json:
        emit_json(args, {"version": info.version, "tasks": list(info.tasks)})
    else:
        print(f"the gateway at {args.gateway} now classifies with {info.version} (tasks: {', '.join(info.tasks)})")
    return 0
