"""Soups, ensembles and similarity of members: pure functions over stacked parameters (leading member axis M) or
over groups of member indices (idx_GxK, padded with -1 where a group has fewer usable members).

Definitions (Wortsman et al. 2022; docs/science.md): the uniform soup is the mean of the members' weights; the greedy soup (Wortsman et al.
2022) visits members in decreasing held-out accuracy and keeps each one only if the soup's held-out accuracy does not
drop; the logit ensemble averages the members' logits. Selection uses the validation split alone: `greedy_soup`
is never given any other data.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlmc.models import Model
from jaxlmc.train import loss_and_error


def group_weights(idx_GxK: np.ndarray, num_members: int) -> np.ndarray:
    """weights_GxM: 1 for each member of each group, 0 elsewhere (the uniform soup's weights)."""
    idx = np.asarray(idx_GxK)
    weights = np.zeros((idx.shape[0], num_members), np.float32)
    for g, row in enumerate(idx):
        weights[g, row[row >= 0]] = 1.0
    return weights


def soup(params_M, weights_M):
    """Σ wₘ θₘ / Σ wₘ: a weighted average of the members' parameters."""
    total = weights_M.sum()
    return jax.tree.map(lambda a: jnp.tensordot(weights_M, a, axes=1) / total, params_M)


def make_soup_accuracy(model: Model):
    """jit(params_M, weights_GxM, eval_set) -> acc_G: accuracy of G soups, one weighted average per row."""

    def accuracy(params_M, weights_GxM, eval_set):
        def one(weights_M):
            return 1.0 - loss_and_error(model, soup(params_M, weights_M), eval_set)[1]

        return lax.map(one, weights_GxM)

    return jax.jit(accuracy)


def greedy_soup(model: Model, params_M, idx_GxK: np.ndarray, val_set, val_acc_M: np.ndarray,
                soup_accuracy=None) -> np.ndarray:
    """weights_GxM of each group's greedy soup, chosen on the validation set `val_set` (with the members' validation
    accuracy `val_acc_M`) and on nothing else. Ties keep the candidate (Wortsman et al.: "does not drop").
    `soup_accuracy` (from make_soup_accuracy) may be passed in to share its compiled program."""
    soup_accuracy = soup_accuracy or make_soup_accuracy(model)
    idx = np.asarray(idx_GxK)
    num_members = len(val_acc_M)
    # Each group's members in decreasing validation accuracy; padding (-1) last.
    keyed = np.where(idx >= 0, -np.asarray(val_acc_M)[np.maximum(idx, 0)], np.inf)
    order = np.take_along_axis(idx, np.argsort(keyed, axis=1, kind="stable"), axis=1)
    weights = np.zeros((idx.shape[0], num_members), np.float32)
    rows = np.arange(idx.shape[0])
    valid = order[:, 0] >= 0
    weights[rows[valid], order[valid, 0]] = 1.0
    current = np.where(valid, np.asarray(val_acc_M)[np.maximum(order[:, 0], 0)], -np.inf)
    for k in range(1, idx.shape[1]):
        candidate = order[:, k]
        trial = weights.copy()
        usable = candidate >= 0
        trial[rows[usable], candidate[usable]] = 1.0
        trial[~usable] = weights[~usable]
        acc = np.asarray(soup_accuracy(params_M, jnp.asarray(trial), val_set))
        accept = usable & (acc >= current)
        weights[accept] = trial[accept]
        current = np.where(accept, acc, current)
    return weights


def make_outputs(model: Model, batch_members: int = 8):
    """jit(params_M, x_NxF) -> (logits_MxNxC, features_MxNxD): every member's logits and penultimate features. For a
    per-token model (a language model: logits M×N×T×C) the features are the final hidden states averaged over the
    sequence's positions, one representation per sequence."""

    def outputs(params_M, x):
        def one(params):
            features = model.features(params, x)
            return model.apply(params, x), features.mean(axis=1) if model.per_token else features

        num = jax.tree.leaves(params_M)[0].shape[0]
        return lax.map(one, params_M, batch_size=min(batch_members, num))

    return jax.jit(outputs)


def ensemble_accuracy(logits_KxNxC, y_N) -> float:
    """Accuracy of the logit ensemble: the argmax of the members' mean logits."""
    mean = np.asarray(logits_KxNxC).mean(axis=0)
    return float((mean.argmax(-1) == np.asarray(y_N)).mean())


def disagreement(preds_KxN) -> np.ndarray:
    """disagree_KxK: the fraction of examples on which two members predict different classes."""
    preds = np.asarray(preds_KxN)
    return (preds[:, None, :] != preds[None, :, :]).mean(axis=-1)


@jax.jit
def linear_cka(features_KxNxD):
    """cka_KxK: linear CKA (Kornblith et al. 2019) between every two members' representations of the same examples:
    ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred features; 1 for representations equal up to rotation and
    isotropic scaling."""
    centred = features_KxNxD - features_KxNxD.mean(axis=1, keepdims=True)
    gram_KxDxD = jnp.einsum("knd,kne->kde", centred, centred)
    self_norm_K = jnp.sqrt((gram_KxDxD ** 2).sum(axis=(1, 2)))

    def row(x_NxD):
        cross_KxDxD = jnp.einsum("knd,ne->kde", centred, x_NxD)
        return (cross_KxDxD ** 2).sum(axis=(1, 2))

    cross_KxK = lax.map(row, centred)
    denom = self_norm_K[:, None] * self_norm_K[None, :]
    return jnp.where(denom > 0, cross_KxK / jnp.where(denom > 0, denom, 1.0), jnp.nan)


def basins(barrier_KxK: np.ndarray, threshold: float) -> np.ndarray:
    """labels_K (0, 1, …, largest basin first): average-linkage clusters of a barrier matrix cut at `threshold`.

    Two clusters merge, closest first, while the mean barrier over the pairs measured between them is at most the
    threshold. A pair not measured (NaN in both (i, j) and (j, i), as in a ring design) is left out of that mean, not
    counted as far: two clusters with no measured pair between them never merge. With every pair measured this is
    UPGMA cut at the threshold (scipy's average linkage with fcluster's distance criterion).
    """
    b = np.asarray(barrier_KxK, np.float64)
    b = np.where(np.isfinite(b), b, b.T)  # a pair measured one way is measured
    k = b.shape[0]
    measured = np.isfinite(b) & ~np.eye(k, dtype=bool)
    total_CxC, count_CxC = np.where(measured, b, 0.0), measured.astype(np.float64)
    clusters = [[i] for i in range(k)]
    while len(clusters) > 1:
        mean = np.where(count_CxC > 0, total_CxC / np.maximum(count_CxC, 1), np.inf)
        np.fill_diagonal(mean, np.inf)
        a, c = np.unravel_index(np.argmin(mean), mean.shape)
        if not mean[a, c] <= threshold:
            break
        a, c = min(a, c), max(a, c)
        clusters[a] += clusters.pop(c)
        for m in (total_CxC, count_CxC):
            m[a, :] += m[c, :]
            m[:, a] += m[:, c]
        total_CxC, count_CxC = (np.delete(np.delete(m, c, 0), c, 1) for m in (total_CxC, count_CxC))
    raw = np.empty(k, np.int64)
    for label, members in enumerate(clusters):
        raw[members] = label
    # Relabel by size (largest first), ties by first member, so labels are comparable between runs.
    uniq, first, counts = np.unique(raw, return_index=True, return_counts=True)
    ranked = uniq[np.lexsort((first, -counts))]
    lookup = {r: n for n, r in enumerate(ranked)}
    return np.array([lookup[r] for r in raw], np.int64)


def ngram_baselines(train_x_NxT, train_y_NxT, x_NxT, y_NxT, vocab: int) -> list[dict]:
    """Unigram and bigram language models counted on a language-modelling task's training split (add-one smoothed),
    scored on (x, y): per-token loss (nats) and accuracy of their most likely next token — the bar a pretrained
    language model must clear to have learnt more than token frequencies."""
    train_x, train_y = np.asarray(train_x_NxT, np.int64).ravel(), np.asarray(train_y_NxT, np.int64).ravel()
    x, y = np.asarray(x_NxT, np.int64).ravel(), np.asarray(y_NxT, np.int64).ravel()
    unigram = np.bincount(train_y, minlength=vocab) + 1.0
    unigram /= unigram.sum()
    bigram = np.ones((vocab, vocab))
    np.add.at(bigram, (train_x, train_y), 1.0)
    bigram /= bigram.sum(axis=1, keepdims=True)
    rows = []
    for name, probs_NxV in (("unigram", np.broadcast_to(unigram, (len(y), vocab))), ("bigram", bigram[x])):
        rows.append({"model": name, "test_loss": float(-np.log(probs_NxV[np.arange(len(y)), y]).mean()),
                     "test_acc": float((probs_NxV.argmax(axis=1) == y).mean())})
    return rows
