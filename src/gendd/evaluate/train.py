"""Evaluate a distilled set: train students under a protocol and test them (mean ± std over seeds).

:func:`evaluate_distilled` prepares the set for the protocol's family (:mod:`gendd.evaluate.recipes`) and fits
one student per seed with the one loop, :func:`gendd.evaluate.fit.fit_student`. ``final_acc`` is the accuracy
after the last pass (what DC/DSA/DM publish); ``best_acc`` the maximum over the periodic tests (test-set
selection, optimistic; what the ImageNet-style papers report). Accuracies are in percent.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from gendd.data.base import ImageDataset
from gendd.errors import DataError
from gendd.evaluate.data import (TestData, accuracy, balanced_indices, check_inputs, format_result,
                                 labels_in_test_order, normalize, prepare_test, run_statistics, summarise_runs)
from gendd.evaluate.fit import fit_student, threads
from gendd.evaluate.protocols import DSAProtocol, Protocol
from gendd.evaluate.recipes import DSARecipe, prepare

__all__ = ["evaluate_distilled", "train_student", "accuracy", "balanced_indices", "format_result",
           "labels_in_test_order", "normalize", "prepare_test", "run_statistics", "summarise_runs"]


def train_student(train_images: torch.Tensor, train_labels: torch.Tensor,
                  test: ImageDataset | TestData, protocol: DSAProtocol, seed: int,
                  progress: bool = True, *, num_classes: int | None = None,
                  desc: str | None = None, return_model: bool = False) -> dict:
    """One DSA-protocol student on normalised float images ``(n, C, S, S)`` with int labels ``(n,)``, tested
    on an :class:`ImageDataset` (loaded and normalised here) or :func:`prepare_test` output.

    Returns :meth:`gendd.evaluate.fit.StudentRun.to_dict` (with ``"model"`` when ``return_model``)."""
    if isinstance(test, ImageDataset):
        if num_classes is None:
            num_classes = test.num_classes
        test = prepare_test(test, protocol.test_limit)
    test_x, test_y = test
    x = train_images.detach().float().contiguous()
    y = train_labels.detach().long()
    if num_classes is None:
        num_classes = int(max(int(y.max()) if y.numel() else 0, int(test_y.max()))) + 1
    check_inputs(x, y, num_classes)
    if tuple(test_x.shape[1:]) != tuple(x.shape[1:]):
        raise DataError(f"train images {tuple(x.shape[1:])} and test images {tuple(test_x.shape[1:])} differ in shape")
    run = fit_student(DSARecipe(protocol, x, y, (test_x, test_y), num_classes), seed, precision=protocol.precision,
                      num_threads=protocol.num_threads, compile=protocol.compile, progress=progress, desc=desc,
                      return_model=return_model)
    return run.to_dict(with_model=return_model)


def evaluate_distilled(train_ds: ImageDataset, test_ds: ImageDataset, protocol: Protocol,
                       seeds: Sequence[int] | None = None, progress: bool = True) -> dict:
    """Train ``protocol.repeats`` students (seeds ``0..repeats-1`` unless given) on ``train_ds``, test on
    ``test_ds``.

    Returns :func:`gendd.evaluate.data.summarise_runs`: ``runs`` (per-student
    :meth:`~gendd.evaluate.fit.StudentRun.to_dict`), ``final_mean``, ``final_std``, ``best_mean``, ``best_std``
    (percent; population std, ddof=0, as the reference's ``np.std``), ``seconds_per_run``, ``seconds_total``,
    ``protocol``, ``dataset``, ``test_split``, ``test_size``, ``train_size``, ``train_class_counts``,
    ``torch_version``, ``num_threads``, and for the ImageNet-style families ``image_size``, ``test_transform``
    and (soft labels) ``teacher``.
    """
    seeds = list(range(protocol.repeats)) if seeds is None else list(seeds)
    if not seeds:
        raise DataError("evaluate_distilled needs at least one seed")
    ready = prepare(protocol, train_ds, test_ds)
    runs = []
    t0 = time.perf_counter()
    with threads(protocol.num_threads) as n_threads:
        for i, s in enumerate(seeds):
            recipe = ready.recipe()
            run = fit_student(recipe, s, precision=protocol.precision, compile=protocol.compile, progress=progress,
                              desc=f"student {i + 1}/{len(seeds)}")
            runs.append(run.to_dict())
    return summarise_runs(runs, protocol, test_ds, ready.test_size, ready.labels, test_ds.num_classes, t0,
                          n_threads, **ready.extra)
