"""classifier/: real MiniLM embedder (the shipped fine-tuned encoder), real training on the seed set (once per
module), a real encoder fine-tune on a small set, artifact round trip."""
from __future__ import annotations

import json
import shutil
import threading

import pytest

import classifier
from classifier import artifact
from classifier.embed import DEFAULT_MAX_TOKENS
from classifier.metrics import evaluate
from classifier.train import ClassifierTrainConfig, predict_file, train
from core.errors import FailedPrecondition, InvalidArgument


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHIPPED = classifier.shipped_encoder_path()


@pytest.fixture(scope="module")
def embedder():
    from classifier.embed import Embedder

    # the default artifacts' encoder: MiniLM fine-tuned on the seed set (shipped LoRA), int8
    return Embedder(quant="int8", lora=SHIPPED)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("clf")
    res = train(ClassifierTrainConfig(data=classifier.seed_path(), out=root, model="embed", version="v1", encoder_lora=SHIPPED),
                embedder=embedder, log=lambda *a: None)
    return root, res


@pytest.fixture(scope="module")
def clf(trained, embedder):
    root, _ = trained
    c = classifier.load(root)
    c._embedder = embedder  # share the loaded model across tests
    return c


def test_artifact_round_trip(trained, clf):
    root, res = trained
    assert (root / "current").read_text().strip() == "v1"
    assert res.path == root / "v1"
    meta = json.loads((root / "v1" / "metadata.json").read_text())
    assert meta["tasks"] == classifier.DEFAULT_TASKS or sorted(meta["tasks"]) == sorted(classifier.DEFAULT_TASKS)
    assert meta["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(meta["data"]["sha256"]) == 64 and meta["files"]["model.safetensors"] and meta["files"]["model.json"]
    assert meta["format_version"] == 2 and not (root / "v1" / "model.joblib").exists()  # data, never a pickle
    assert meta["created_at"] and 0.0 < meta["threshold"] < 1.0
    assert clf.version == "v1" and clf.threshold == meta["threshold"] and sorted(clf.tasks) == sorted(classifier.DEFAULT_TASKS)
    # a version folder loads directly too, and predictions are identical
    again = classifier.load(root / "v1")
    again._embedder = clf._embedder
    assert again.predict(["Write a haiku about rain."]) == clf.predict(["Write a haiku about rain."])


def test_predict_shapes_and_scores(clf):
    preds = clf.predict_detailed(["Solve 2x + 3 = 11 for x.", "Translate to French: good night"])
    assert [p.task for p in preds] == ["math", "translation"]
    for p in preds:
        assert set(p.scores) == set(clf.tasks)
        assert abs(sum(p.scores.values()) - 1.0) < 1e-5
        assert p.confidence == max(p.scores.values()) and not p.truncated
    assert clf.predict([]) == []


HARD_CASES = [
    ("Write a blog post for our company site about why we moved from REST to gRPC.", "writing"),
    ("Write a Python function that parses ISO dates and returns a datetime.", "code"),
    ("Translate the comments in this code to English: # 计算总和\ntotal = sum(xs)", "translation"),
    ("Summarize this: The council voted 5-4 to approve a six-month bike lane pilot on Main Street after a long debate.", "summarization"),
    ("Rewrite this paragraph to sound more professional: hey the report is late again sorry", "writing"),
    ("I will send you my document in parts. Only reply 'acknowledged' after each part.", "general"),
    ("Extract the name and email as JSON: Contact Jane Roe at jane.roe@example.com.", "extraction"),
    ("What is the probability of drawing two aces from a deck without replacement?", "math"),
]


@pytest.mark.parametrize("text,task", HARD_CASES)
def test_hard_cases(clf, combined, text, task):
    """The default model (embed on the shipped fine-tuned encoder) and the combined kind get every hard case of
    the task definitions right."""
    assert clf.predict([text])[0][0] == task
    assert combined[1].predict([text])[0][0] == task


def test_threshold_abstains(trained, embedder, tmp_path):
    root, _ = trained
    shutil.copytree(root / "v1", tmp_path / "v1")
    c = classifier.load(tmp_path / "v1")
    c._embedder = embedder
    text = "hmm"
    p = c.predict_detailed([text])[0]
    assert p.abstained == (p.confidence < c.threshold)
    c.threshold = 1.01  # nothing is ever confident enough: everything abstains
    assert all(q.abstained for q in c.predict_detailed([text, "Solve x^2 = 9"]))
    c.threshold = 0.0
    assert not any(q.abstained for q in c.predict_detailed([text]))


def test_long_text_is_truncated(clf):
    long = "Please summarize the following report. " + "The quarterly revenue grew strongly in all regions. " * 200
    p = clf.predict_detailed([long, "short text about cats"])
    assert p[0].truncated and not p[1].truncated


@pytest.mark.parametrize("bad", ["", "   \n\t "])
def test_empty_text_is_invalid(clf, bad):
    with pytest.raises(InvalidArgument, match="empty"):
        clf.predict(["ok", bad])


def test_single_string_is_invalid(clf):
    with pytest.raises(InvalidArgument):
        clf.predict("not a list")


def test_missing_artifact(tmp_path):
    with pytest.raises(FailedPrecondition, match="classifier train"):
        classifier.load(tmp_path / "nothing-here")


def test_corrupt_metadata(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "v1", tmp_path / "v1")
    (tmp_path / "v1" / "metadata.json").write_text("{not json")
    with pytest.raises(FailedPrecondition, match="metadata.json"):
        classifier.load(tmp_path / "v1")


def test_tampered_model_file(trained, tmp_path):
    root, _ = trained
    shutil.copytree(root / "v1", tmp_path / "v1")
    with open(tmp_path / "v1" / "model.safetensors", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(FailedPrecondition, match="sha256"):
        classifier.load(tmp_path / "v1")


def test_current_names_missing_version(tmp_path):
    (tmp_path / "current").write_text("v9\n")
    with pytest.raises(FailedPrecondition, match="v9"):
        classifier.load(tmp_path)


def test_custom_task_set(tmp_path, ops_data):
    from classifier.embed import shared

    embedder = shared("int8")  # the stock encoder
    data = ops_data
    res = train(ClassifierTrainConfig(data=data, out=tmp_path / "art", model="embed", encoder="base", threshold=0.3,
                                      val_fraction=0.34),
                embedder=embedder, log=lambda *a: None)
    c = classifier.load(tmp_path / "art")
    c._embedder = embedder
    assert sorted(c.tasks) == ["other", "refund", "status"] and c.threshold == 0.3
    assert res.metadata["data"]["per_task"] == {"other": 5, "refund": 5, "status": 5}
    assert c.predict(["Where is my package right now?"])[0][0] == "status"
    assert c.predict(["I'd like a refund please"])[0][0] == "refund"


def test_bad_training_data(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(InvalidArgument, match="bad.jsonl:2"):
        train(ClassifierTrainConfig(data=data, out=tmp_path / "art", model="tfidf", encoder="base"), log=lambda *a: None)


def test_thread_safe_predict(clf):
    texts = ["Write a SQL query counting users per country.", "Write a poem about the sea."]
    expected = clf.predict(texts)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(clf.predict(texts))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(r == expected for r in results)


@pytest.mark.parametrize("path", classifier.heldout_paths(), ids=lambda p: p.name)
def test_heldout_accuracy_is_computed(clf, path):
    ex, pred, conf = predict_file(clf, path)
    assert len(ex.texts) >= 250
    m = evaluate(ex.labels, pred, conf, clf.tasks, clf.threshold)
    assert m["accuracy"] >= 0.5  # sane floor only; the real figure is in docs/bench-classifier.md
    r = m["routing"]
    assert r["routed_to_specialist"] + r["fallback_to_base"] == len(ex.texts)


def test_heldout_sets_never_seen_in_training():
    """No held-out prompt, and no other turn of a held-out conversation, is in the seed set: held-out figures
    measure prompts from conversations the classifier (and its fine-tuned encoder) never saw."""
    import re

    def conv(row):  # ShareGPT V3 ids are <conversation>_<part>
        src = row.get("source", "")
        return src.split(":", 1)[1].rsplit("_", 1)[0] if src.startswith("sharegpt:") else None

    def norm(text):
        return re.sub(r"\s+", " ", text.lower()).strip()

    def rows_of(path):  # one JSON object per "\n"-terminated line (texts may hold U+2028 etc.)
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    seed = rows_of(classifier.seed_path())
    seed_convs, seed_texts = {conv(r) for r in seed} - {None}, {norm(r["text"]) for r in seed}
    for path in classifier.heldout_paths():
        rows = rows_of(path)
        assert all(conv(r) for r in rows), f"{path.name}: every held-out row names its ShareGPT conversation"
        assert not {conv(r) for r in rows} & seed_convs, f"{path.name} shares conversations with the seed set"
        assert not {norm(r["text"]) for r in rows} & seed_texts, f"{path.name} shares prompts with the seed set"


def test_cli_train_eval_predict(tmp_path, capsys, trained):
    from cli import main

    root, _ = trained
    assert main(["classifier", "eval", "--path", str(root), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert {"accuracy", "macro_f1", "per_class", "confusion", "routing"} <= set(m)
    assert main(["classifier", "predict", "--path", str(root), "Solve 3x = 12"]) == 0
    assert capsys.readouterr().out.startswith("math")
    assert main(["classifier", "eval", "--path", str(tmp_path / "none")]) == 2
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} number {i}", "label": w}) + "\n"
                            for w in ("alpha", "beta") for i in range(6)))
    assert main(["classifier", "train", "--data", str(data), "--out", str(tmp_path / "a"), "--model", "tfidf"]) == 0
    assert (tmp_path / "a" / "current").is_file()
    assert main(["classifier", "train", "--data", str(data), "--encoder", "base", "--encoder-lora",
                 str(classifier.shipped_encoder_path())]) == 2  # contradictory flags: a one-line error


def test_ensure_default_is_idempotent(trained, monkeypatch, tmp_path):
    root, _ = trained
    home = tmp_path / "home"
    shutil.copytree(root / "v1", home / "classifier" / "v1")
    artifact.set_current(home / "classifier", "v1")
    monkeypatch.setenv("SPECIALIST_ROUTER_HOME", str(home))
    # `trained` is this release's recipe on the shipped seed: it is kept as it is, on every call
    assert not classifier._stale_default(home / "classifier" / "v1")
    assert classifier.ensure_default() == home / "classifier" / "v1"
    assert classifier.ensure_default() == home / "classifier" / "v1"


def test_ensure_default_rebuilds_a_stale_default_once(trained, monkeypatch, tmp_path):
    root, _ = trained
    home = tmp_path / "home"
    shutil.copytree(root / "v1", home / "classifier" / "old")
    meta_path = home / "classifier" / "old" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["kind"] = "combined"  # built by an older release's recipe
    meta_path.write_text(json.dumps(meta))
    artifact.set_current(home / "classifier", "old")
    monkeypatch.setenv("SPECIALIST_ROUTER_HOME", str(home))
    assert classifier._stale_default(home / "classifier" / "old")
    rebuilt = classifier.ensure_default()
    assert rebuilt.parent == home / "classifier" and rebuilt.name != "old"
    assert not classifier._stale_default(rebuilt)
    assert artifact.resolve(home / "classifier") == rebuilt  # `current` points at the new build
    assert classifier.ensure_default() == rebuilt  # and it is kept from then on


@pytest.fixture(scope="module")
def combined(tmp_path_factory, embedder):
    """The default kind, trained once on the seed set: (train result, loaded classifier)."""
    root = tmp_path_factory.mktemp("combined")
    res = train(ClassifierTrainConfig(data=classifier.seed_path(), out=root, model="combined", version="c1",
                            encoder_lora=SHIPPED), embedder=embedder, log=lambda *a: None)
    c = classifier.load(root)
    c._embedder = embedder
    return res, c


def test_combined_model(combined, embedder):
    """The combined kind: TF-IDF + fine-tuned embeddings of the first 96 wordpieces (the default window)."""
    res, c = combined
    meta = res.metadata
    assert meta["kind"] == "combined" and meta["max_tokens"] == DEFAULT_MAX_TOKENS == 96
    assert meta["embedding_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["embedding_quant"] == "int8"
    assert meta["encoder"]["finetuned"] and meta["files"]["encoder_lora.safetensors"] == meta["encoder"]["sha256"]
    assert c.max_tokens == 96 and c.quant == "int8" and c.lora == res.path / "encoder_lora.safetensors"
    assert [t for t, _ in c.predict([t for t, _ in HARD_CASES])] == [task for _, task in HARD_CASES]
    long = "Please summarize the following report. " + "Revenue grew in all regions this quarter. " * 30
    p = c.predict_detailed([long, "Write a haiku about rain."])
    assert p[0].truncated and not p[1].truncated  # ~250 wordpieces: over the 96 window
    assert abs(sum(p[0].scores.values()) - 1.0) < 1e-5


def test_window_defaults_agree():
    """Training, the encoder fine-tune, the CLI and prediction all default to the same embedding window."""
    import argparse

    from classifier.finetune import FinetuneConfig
    from cli.classifier import add_commands

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers())
    train_parser = p._subparsers._group_actions[0].choices["classifier"]._subparsers._group_actions[0].choices["train"]
    flag = next(a for a in train_parser._actions if "--max-tokens" in a.option_strings)
    assert ClassifierTrainConfig().max_tokens == FinetuneConfig().max_tokens == DEFAULT_MAX_TOKENS
    assert f"default: {DEFAULT_MAX_TOKENS}]" in flag.help  # the CLI shows (and uses) the config's default


def test_embedding_window(embedder):
    text = "word " * 200  # ~200 wordpieces
    X128, t128 = embedder.encode([text], max_tokens=128)
    X256, t256 = embedder.encode([text], max_tokens=256)
    assert t128 == [True] and t256 == [False] and X128.shape == X256.shape == (1, 384)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        ClassifierTrainConfig(data=classifier.seed_path(), out=classifier.seed_path().parent, max_tokens=1000).validate()
    with pytest.raises(InvalidArgument, match="quantization"):
        ClassifierTrainConfig(data=classifier.seed_path(), out=classifier.seed_path().parent, quant="fp8").validate()
    # int8 stays close to the float32 encoder it approximates (same direction, ~0.9+ cosine on real text)
    from classifier.embed import shared

    texts = ["Write a SQL query that counts orders per customer.", "Translate 'good morning' into German."]
    a, _ = embedder.encode(texts)
    b, _ = shared("none", SHIPPED).encode(texts)
    assert embedder.quant == "int8" and float((a * b).sum(1).min()) > 0.8


def test_combined_blockwise_proba_matches_sklearn(combined):
    """CombinedModel.predict_proba (block by block) gives scikit-learn's numbers on the stacked design."""
    import numpy as np

    from classifier.combined import TextsAndEmbeddings

    _, c = combined
    texts = ["Write a haiku about rain.", "SELECT * FROM t WHERE", "Übersetze bitte: good night"]
    X = TextsAndEmbeddings(texts, c.embedder.encode(texts, max_tokens=c.max_tokens)[0])
    assert np.allclose(c.model.predict_proba(X), c.model.lr_.predict_proba(c.model._design(X)), atol=1e-9)


TWO_TASK_ROWS = [(f"Please fix the bug in my {w} function, it throws an exception", "code") for w in
                 ("python", "java", "rust", "go", "sql", "bash", "kotlin", "ruby")]
TWO_TASK_ROWS += [(f"Write a short {w} poem about the autumn sea for my friend", "writing") for w in
                  ("sad", "happy", "long", "funny", "rhyming", "gentle", "dark", "bright")]


def test_finetuned_encoder_artifact(tmp_path):
    """`--encoder finetune`: a real LoRA fine-tune of MiniLM on a small labeled set; the factors ship in the
    version folder (fingerprinted), load merged into the encoder, and a tampered file is refused."""
    import numpy as np

    from classifier.embed import shared

    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in TWO_TASK_ROWS))
    logs = []
    cfg = ClassifierTrainConfig(data=data, out=tmp_path / "art", model="embed", encoder="finetune", finetune_epochs=2,
                      max_tokens=32, val_fraction=0.25, version="f1")
    res = train(cfg, log=logs.append)
    enc = res.metadata["encoder"]
    assert enc["finetuned"] and enc["recipe"]["epochs"] == 2 and enc["recipe"]["examples"] == 12  # training split
    assert enc["validation_unseen_by_encoder"] is True
    assert enc["recipe"]["trained_on"] == {"data_sha256": res.metadata["data"]["sha256"], "val_fraction": 0.25,
                                           "split_seed": 0}
    lora = res.path / "encoder_lora.safetensors"
    assert res.metadata["files"]["encoder_lora.safetensors"] == enc["sha256"] and lora.stat().st_size > 100_000
    assert any("fine-tuning the encoder" in str(m) for m in logs)
    c = classifier.load(res.path)
    assert c.lora == lora
    texts = ["Please fix the bug in my swift function, it throws an exception"]
    assert not np.allclose(c.embedder.encode(texts)[0], shared("int8").encode(texts)[0], atol=1e-3)
    assert c.predict(texts)[0][0] == "code"
    # the same data and recipe reuse the cached fine-tune
    logs.clear()
    train(ClassifierTrainConfig(**{**cfg.__dict__, "version": "f2"}), log=logs.append)
    assert any("reusing the fine-tuned encoder" in str(m) for m in logs)
    # the same encoder reused by file on the same data and split: its validation rows are known to be unseen;
    # on another split they may not be, and train says so
    same = train(ClassifierTrainConfig(**{**cfg.__dict__, "version": "f3", "encoder": "auto", "encoder_lora": lora}),
                 log=logs.append)
    assert same.metadata["encoder"]["validation_unseen_by_encoder"] is True
    logs.clear()
    other = train(ClassifierTrainConfig(**{**cfg.__dict__, "version": "f4", "encoder_lora": lora, "seed": 1}), log=logs.append)
    assert other.metadata["encoder"]["validation_unseen_by_encoder"] is False
    assert any("may not be held out" in str(m) for m in logs)
    with open(lora, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(FailedPrecondition, match="sha256"):
        classifier.load(res.path)
    with pytest.raises(InvalidArgument, match="--encoder"):
        ClassifierTrainConfig(data=data, out=tmp_path, encoder="bert-large").validate()


def test_finetune_fewer_layers(tmp_path):
    """`--finetune-layers N`: the encoder is cut to its first N transformer layers for the fine-tune; the LoRA
    file records N and every later load cuts the encoder the same way (traced and eager alike)."""
    import numpy as np

    from classifier.embed import Embedder
    from classifier.encoder_lora import read_summary
    from classifier.finetune import FinetuneConfig, finetune

    lora = tmp_path / "l3.safetensors"
    texts, labels = [t for t, _ in TWO_TASK_ROWS], [v for _, v in TWO_TASK_ROWS]
    summary = finetune(texts, labels, lora, FinetuneConfig(epochs=1, layers=3, max_tokens=32), log=lambda *a: None)
    assert summary["layers"] == 3 and read_summary(lora)["layers"] == 3
    traced, eager = Embedder(lora=lora, max_tokens=32), Embedder(lora=lora, max_tokens=32, trace=False)
    assert len(traced.model.encoder.layer) == len(eager.model.encoder.layer) == 3
    a, b = traced.encode(texts[:3])[0], eager.encode(texts[:3])[0]
    assert np.allclose(a, b, atol=1e-5) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    with pytest.raises(InvalidArgument, match="--finetune-layers"):
        FinetuneConfig(layers=7).validate()


@pytest.mark.parametrize("text", [
    "Please summarize the following report. " + "Revenue grew in all regions this quarter. " * 30,
    "word " * 40 + "antidisestablishmentarianism " * 30,  # long words straddle the first cut
    "x" * 5000,  # no whitespace at all: tokenized from the full character cap
    "短" * 300 + " tail",
])
def test_window_tokens_match_full_tokenization(embedder, text):
    """The embedder tokenizes once, a whole-word prefix one token past the window, and cuts back: exactly the
    vector that tokenizing the whole text and truncating at the window gives."""
    import numpy as np
    import torch

    got, trunc = embedder.encode([text], max_tokens=32)
    enc = embedder.tokenizer([text], truncation=True, max_length=32, return_tensors="pt")
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(embedder.model(**enc).last_hidden_state.mean(1), dim=1).numpy()
    assert trunc == [True] and np.allclose(got, ref, atol=1e-5)


def test_traced_encoder_equals_eager(embedder):
    """Inference runs a frozen TorchScript trace of the (int8) encoder: the same vectors as the eager model, alone
    and in padded batches of other sizes and lengths than it was traced on."""
    import numpy as np

    from classifier.embed import Embedder

    assert embedder.traced is not None
    eager = Embedder(quant="int8", lora=SHIPPED, trace=False)
    assert eager.traced is None
    texts = [t for t, _ in HARD_CASES] + ["hi", "Please summarize this. " * 60]
    for batch in (texts, texts[:1], texts[-1:], texts[3:6]):
        got, _ = embedder.encode(batch)
        ref, _ = eager.encode(batch)
        assert got.shape == ref.shape and np.allclose(got, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["embed", "tfidf", "combined"])
def test_model_saved_as_data_predicts_the_same(kind, tmp_path):
    """Every kind `classifier train` fits survives the no-pickle format (arrays + JSON) with the same
    probabilities, on texts the model has not seen."""
    import numpy as np

    from classifier import modelio
    from classifier.combined import TextsAndEmbeddings
    from classifier.train import make_model

    rng = np.random.default_rng(0)
    texts = [f"{w} {rng.integers(1000)} please {w}s" for w in ("sql", "poem", "sum") for _ in range(8)]
    labels = [t.split()[0] for t in texts]
    emb = rng.normal(size=(len(texts), 384))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    x = {"embed": emb, "tfidf": texts, "combined": TextsAndEmbeddings(texts, emb)}[kind]
    model = make_model(kind, None).fit(x, labels)
    modelio.save(model, kind, tmp_path)
    again = modelio.load(tmp_path, kind, "retrain")
    new_texts = ["sql 5 please poems", "a sum of poems", "nothing known here"]
    new_emb = rng.normal(size=(3, 384))
    new_x = {"embed": new_emb, "tfidf": new_texts, "combined": TextsAndEmbeddings(new_texts, new_emb)}[kind]
    assert list(again.classes_) == list(model.classes_)
    np.testing.assert_allclose(again.predict_proba(new_x), model.predict_proba(new_x), rtol=1e-12, atol=1e-12)


def test_a_pickled_artifact_is_refused_and_never_unpickled(trained, tmp_path):
    """The old format was a pickle: an artifact folder with a payload in `model.joblib` (and metadata whose
    sha256 matches it, as an attacker writing both files would make) is refused, and the payload never runs."""
    import hashlib
    import pickle

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    root, _ = trained
    for fmt in (1, 2):
        v = tmp_path / f"evil{fmt}"
        shutil.copytree(root / "v1", v)
        for f in ("model.safetensors", "model.json"):
            (v / f).unlink()
        blob = pickle.dumps(Payload())
        (v / "model.joblib").write_bytes(blob)
        meta = json.loads((v / "metadata.json").read_text())
        meta["format_version"] = fmt
        meta["files"] = {**{k: d for k, d in meta["files"].items() if not k.startswith("model.")},
                         "model.joblib": hashlib.sha256(blob).hexdigest()}
        (v / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(FailedPrecondition, match="format version 1 .a pickle" if fmt == 1 else "model files"):
            classifier.load(v)
    assert not marker.exists()
