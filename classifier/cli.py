"""`specialist-router classifier {train,eval,predict}`: build, score and try the task classifier.

Each command is `main_<name>(args) -> int`; errors a user can fix raise `router.errors.UserError`
subclasses, which the top-level CLI prints as one line (exit status 2).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("classifier", help="train, evaluate and try the task classifier",
                              description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="classifier_command", metavar="SUBCOMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a new artifact version from labeled JSONL and make it current")
    t.add_argument("--data", type=Path, default=None, help="labeled JSONL ({'text','label'} per line); default: the seed set")
    t.add_argument("--out", type=Path, default=None, help="artifact root; default: <data dir>/classifier")
    t.add_argument("--model", choices=("combined", "embed", "tfidf", "auto"), default=None,
                   help="embed: logistic regression on the MiniLM embeddings (default with a fine-tuned encoder); "
                        "combined: TF-IDF word+char n-grams stacked with the embeddings (default with --encoder base); "
                        "tfidf: TF-IDF only; auto: the best on the validation split")
    from classifier.embed import DEFAULT_MAX_TOKENS

    t.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"embed only the first N wordpieces of each prompt (8..256; default {DEFAULT_MAX_TOKENS})")
    t.add_argument("--quant", choices=("int8", "none"), default="int8",
                   help="encoder precision: int8 dynamic quantization (default, ~3x faster on CPU) or none (float32)")
    t.add_argument("--encoder", choices=("finetune", "base"), default=None,
                   help="finetune: fine-tune the MiniLM encoder (LoRA) on the training split first (best accuracy; "
                        "~2 min per 1,000 examples on 2 CPU cores); base: the stock encoder (fast). Default: finetune, "
                        "except on the seed set, which reuses the shipped fine-tuned encoder")
    t.add_argument("--encoder-lora", type=Path, default=None,
                   help="reuse a fine-tuned encoder (an encoder_lora.safetensors from an artifact) instead")
    t.add_argument("--finetune-epochs", type=int, default=4, help="encoder fine-tuning epochs (default 4)")
    t.add_argument("--finetune-layers", type=int, default=None,
                   help="keep only the encoder's first N transformer layers (1..6; default all 6): less compute per "
                        "prompt, usually some accuracy lost")
    t.add_argument("--threshold", type=float, default=None, help="fixed abstain threshold in [0,1]; default: chosen on the validation split")
    t.add_argument("--max-misroute", type=float, default=0.02, help="threshold choice: accepted validation misroute rate")
    t.add_argument("--version", default="", help="version folder name; default: UTC timestamp")
    t.add_argument("--json", action="store_true", help="print the artifact metadata as JSON")
    t.set_defaults(func=main_train)

    e = sub.add_parser("eval", help="accuracy, macro-F1, per-class scores, confusion and routing on labeled JSONL")
    e.add_argument("--data", type=Path, default=None, help="labeled JSONL; default: the held-out real set")
    e.add_argument("--path", type=Path, default=None, help="artifact (root or version folder); default: current")
    e.add_argument("--threshold", type=float, default=None, help="evaluate at this threshold instead of the artifact's")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(func=main_eval)

    q = sub.add_parser("predict", help="classify texts given as arguments, or one per line on stdin")
    q.add_argument("texts", nargs="*", help="texts; none: read lines from stdin")
    q.add_argument("--path", type=Path, default=None, help="artifact (root or version folder); default: current")
    q.add_argument("--json", action="store_true", help="one JSON object per text")
    q.set_defaults(func=main_predict)


def main_train(args) -> int:
    import classifier
    from classifier.train import TrainConfig, train
    from router.errors import InvalidArgument
    from router.paths import classifier_dir

    _threads()
    data = args.data or classifier.seed_path()
    lora = args.encoder_lora
    if lora is not None and args.encoder == "base":
        raise InvalidArgument("--encoder base and --encoder-lora contradict each other: pass one of them")
    if lora is None and args.encoder is None and Path(data).resolve() == classifier.seed_path().resolve():
        lora = classifier.shipped_encoder_path()  # the seed set's fine-tuned encoder ships with the package
    encoder = args.encoder or "finetune"
    model = args.model or ("combined" if encoder == "base" and lora is None else "embed")
    cfg = TrainConfig(data=data, out=args.out or classifier_dir(), model=model,
                      threshold=args.threshold, max_misroute=args.max_misroute, version=args.version,
                      max_tokens=args.max_tokens, quant=args.quant, encoder=encoder,
                      encoder_lora=lora, finetune_epochs=args.finetune_epochs,
                      finetune_layers=args.finetune_layers)
    res = train(cfg, log=(lambda *a: print(*a, file=sys.stderr)) if args.json else print)
    if args.json:
        print(json.dumps(res.metadata, indent=2))
    else:
        print(f"current classifier: {res.path}")
    return 0


def main_eval(args) -> int:
    import classifier
    from classifier.metrics import evaluate, format_report
    from classifier.train import predict_file
    from router.errors import InvalidArgument

    _threads()
    clf = classifier.load(args.path)
    data = args.data or classifier.heldout_path()
    ex, pred, conf = predict_file(clf, data)
    unknown = sorted(set(ex.labels) - set(clf.tasks))
    if unknown:
        raise InvalidArgument(f"{data} has labels {unknown} that classifier {clf.version} does not know ({clf.tasks})")
    thr = clf.threshold if args.threshold is None else float(args.threshold)
    m = evaluate(ex.labels, pred, conf, clf.tasks, thr)
    m.update(version=clf.version, kind=clf.kind, data=str(data))
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(format_report(m, f"classifier {clf.version} ({clf.kind}) on {data}"))
    return 0


def main_predict(args) -> int:
    import classifier

    _threads()
    texts = list(args.texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    clf = classifier.load(args.path)
    for text, p in zip(texts, clf.predict_detailed(texts)):
        if args.json:
            print(json.dumps({"task": p.task, "confidence": round(p.confidence, 4), "abstained": p.abstained,
                              "truncated": p.truncated, "scores": {k: round(v, 4) for k, v in p.scores.items()}}))
        else:
            flag = " (abstain: base model)" if p.abstained else ""
            print(f"{p.task}\t{p.confidence:.3f}{flag}\t{text[:60]!r}")
    return 0


def _threads() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":  # python -m classifier.cli train|eval|predict ...
    from router.cli import main as _main

    sys.exit(_main(["classifier", *sys.argv[1:]]))
