"""The `combined` model: TF-IDF word 1-2 grams + char 2-5 grams, stacked with weighted MiniLM embeddings,
then one logistic regression.

Its input is a `TextsAndEmbeddings` pair (the raw texts for the TF-IDF half, the sentence embeddings for the
other), so the artifact's `Classifier.features` computes the embeddings once and hands both over.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TextsAndEmbeddings:
    texts: list[str]
    emb: np.ndarray  # [n, 384], L2-normalized

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx) -> "TextsAndEmbeddings":
        idx = np.asarray(idx)
        return TextsAndEmbeddings([self.texts[i] for i in idx], self.emb[idx])


class CombinedModel:
    """hstack(TF-IDF word 1-2 grams, TF-IDF char_wb 2-5 grams, emb_weight * embedding) -> LogisticRegression.

    Each TF-IDF block is L2-normalized per row, as is the embedding, so `emb_weight` sets the embedding's share.
    """

    def __init__(self, C: float = 10.0, emb_weight: float = 1.0, seed: int = 0):
        self.C = C
        self.emb_weight = emb_weight
        self.seed = seed

    def _design(self, X: TextsAndEmbeddings):
        # lazy: scipy.sparse costs ~0.3 s to import; only the TF-IDF features need it
        from scipy.sparse import csr_matrix, hstack

        return hstack([self.word_.transform(X.texts), self.char_.transform(X.texts),
                       csr_matrix(np.asarray(X.emb, dtype=np.float64) * self.emb_weight)]).tocsr()

    def fit(self, X: TextsAndEmbeddings, y) -> "CombinedModel":
        # lazy: scikit-learn costs ~1.5 s to import; only fitting and scoring need it
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        self.word_ = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, max_features=200_000).fit(X.texts)
        self.char_ = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True,
                                     max_features=300_000).fit(X.texts)
        self.lr_ = LogisticRegression(C=self.C, max_iter=5000, class_weight="balanced",
                                      random_state=self.seed).fit(self._design(X), np.asarray(y))
        self.classes_ = self.lr_.classes_
        return self

    def predict_proba(self, X: TextsAndEmbeddings) -> np.ndarray:
        """Same numbers as `lr_.predict_proba(hstack(...))`, computed block by block: each sparse TF-IDF block
        times its slice of the coefficients, plus the dense embedding part, then a softmax. Skips building the
        stacked sparse matrix and scikit-learn's checks (~0.6 ms of a single prompt's budget)."""
        Ww, Wc, We, b = self._blocks()
        z = (np.asarray(self.word_.transform(X.texts) @ Ww) + np.asarray(self.char_.transform(X.texts) @ Wc)
             + (np.asarray(X.emb, dtype=np.float64) * self.emb_weight) @ We + b)
        if z.shape[1] == 1:  # binary logistic regression: one logit for classes_[1]
            z = np.hstack([np.zeros_like(z), z])
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def _blocks(self):
        blocks = getattr(self, "_blocks_", None)
        if blocks is None:
            nw, nc = len(self.word_.vocabulary_), len(self.char_.vocabulary_)
            W = np.ascontiguousarray(self.lr_.coef_.T)  # [features, classes or 1]
            blocks = (W[:nw], W[nw:nw + nc], W[nw + nc:], self.lr_.intercept_)
            self._blocks_ = blocks
        return blocks

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_blocks_", None)  # derived from lr_; not pickled
        return state

    def predict(self, X: TextsAndEmbeddings) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]
