"""A weighted k-nearest-neighbour monitor on backbone features, for progress during pre-training.

Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(arXiv:1805.01978), section 3.4, as used by DINO (Caron et al. 2021, arXiv:2104.14294, eval_knn):
features f are L2-normalised; for a query q its k most cosine-similar bank samples N_k(q) vote
for their labels with weights exp(s_i / T),

    score_c(q) = sum_{i in N_k(q), y_i = c} exp(q . f_i / T),     prediction = argmax_c score_c

k = 200 and T = 0.07 in both papers (DINO reports 20 as well). It needs no training, so it is a
cheap signal every few epochs: one forward pass over a bank (a subset of the training set with
validation-style crops is enough) and over the queries. Every rank encodes its shard of the
bank; the shards are gathered (`allgather_object`, CPU tensors) so each rank holds the whole bank,
classifies its shard of the queries, and the correct counts are summed over ranks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lars.metrics import DeviceCounters

__all__ = ["extract_features", "gather_bank", "knn_top1", "weighted_knn_predict"]


@torch.no_grad()
def extract_features(model: nn.Module, loader, device, prepare=None):
    """(L2-normalised float32 features, labels) of `loader` on this rank, on `device`.
    The model runs in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    for batch in loader:
        images, targets = batch[0], batch[1]
        if images is None:
            continue
        images = images.to(device, non_blocking=True)
        if prepare is not None:
            images = prepare(images)
        features.append(F.normalize(model(images).float(), dim=1))
        labels.append(targets.to(device))
    model.train(was_training)
    if not features:
        return torch.empty(0, 0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(features), torch.cat(labels)


def gather_bank(features: torch.Tensor, labels: torch.Tensor, dist):
    """Every rank's (features, labels) concatenated in rank order, on this rank's device."""
    if dist is None or dist.size == 1:
        return features, labels
    parts = dist.allgather_object((features.cpu(), labels.cpu()), name="lars.knn_bank")
    parts = [(f, y) for f, y in parts if y.numel()]
    device = features.device
    return torch.cat([f for f, _ in parts]).to(device), torch.cat([y for _, y in parts]).to(device)


@torch.no_grad()
def weighted_knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int = 256,
) -> torch.Tensor:
    """The weighted-vote class of each (L2-normalised) query, as in the module docstring.
    k is capped at the bank's size; queries are scored `chunk` at a time (memory: chunk x bank)."""
    k = min(k, bank.shape[0])
    predictions = []
    for start in range(0, queries.shape[0], chunk):
        similarity = queries[start : start + chunk] @ bank.T
        top, index = similarity.topk(k, dim=1)
        weights = (top / temperature).exp()
        scores = torch.zeros(top.shape[0], num_classes, device=queries.device, dtype=weights.dtype)
        scores.scatter_add_(1, bank_labels[index], weights)
        predictions.append(scores.argmax(dim=1))
    if not predictions:
        return torch.empty(0, dtype=torch.long, device=queries.device)
    return torch.cat(predictions)


def knn_top1(
    model: nn.Module,
    bank_loader,
    query_loader,
    num_classes: int,
    dist,
    device,
    k: int = 200,
    temperature: float = 0.07,
    prepare=None,
) -> dict[str, float]:
    """Whole-set weighted k-NN top-1 (percent) of `query_loader`'s samples against the bank.

    `model` maps images to features (`BarlowTwins.backbone`). Collective: every rank calls it.
    """
    bank, bank_labels = gather_bank(*extract_features(model, bank_loader, device, prepare), dist)
    queries, labels = extract_features(model, query_loader, device, prepare)
    counters = DeviceCounters(("correct", "samples"), device)
    if queries.numel() and bank.numel():
        predicted = weighted_knn_predict(queries, bank, bank_labels, num_classes, k, temperature)
        counters.add(correct=(predicted == labels).sum(), samples=labels.shape[0])
    sums = counters.read(dist)
    return {
        "top1": 100.0 * sums["correct"] / max(sums["samples"], 1.0),
        "samples": int(sums["samples"]),
        "bank": int(bank.shape[0]),
    }
