"""Randomness that resumes exactly: data order and augmentations as pure functions of (seed, epoch, position).

ppdet's reader cannot be resumed exactly: its sampler reshuffles with an internal counter that restarts
at 0 in a new process, its loader thread prefetches the *next* epoch while the current one is evaluated
(with the dataset's stale epoch, so the first batches after ``close_mosaic`` still get Mosaic), and the
augmentations draw from the global ``random``/``numpy`` generators in whatever order the threads run.

:class:`SeededLoader` replaces ``trainer.loader``: each epoch's order is a permutation seeded by
(seed, epoch); each sample is loaded after seeding ``random`` and ``numpy`` from (seed, epoch, position),
and each batch transform from (seed, epoch, batch). A run resumed at epoch k therefore sees exactly the
batches an uninterrupted run sees, in any process, with any number of loader workers. Paddle's own
generator is re-seeded from (seed, epoch) at every epoch start (:func:`seed_epoch`): its CPU state cannot
be serialised in Paddle 2.6 (``GeneratorState`` pickles to seed and offset only, not the engine state).
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np


def derive_seed(seed: int, *parts: Any) -> int:
    """A 32-bit seed that depends only on ``seed`` and ``parts`` (stable across processes and platforms)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def seed_python_numpy(value: int) -> None:
    random.seed(value)
    np.random.seed(value)


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed every generator for the start of ``epoch`` (0-based)."""
    from detect.heavy import paddle_stack

    seed_python_numpy(derive_seed(seed, "epoch", epoch))
    paddle_stack().paddle.seed(derive_seed(seed, "paddle", epoch))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The sample order of ``epoch``: a permutation of ``range(n)`` seeded by (seed, epoch)."""
    return np.random.RandomState(derive_seed(seed, "order", epoch)).permutation(n)


def capture_rng() -> dict[str, Any]:
    """Python and numpy generator states as JSON-able data (paddle's: see the module docstring)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(state), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(saved: dict[str, Any]) -> None:
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def drop_slivers(sample: dict, min_side: float) -> dict:
    """Remove boxes thinner than ``min_side`` px: ppdet's Mosaic clips boxes to the canvas but keeps the
    zero-width remains of defects cut off at the border (YOLOX filters them; ppdet does not)."""
    boxes = sample.get("gt_bbox")
    if boxes is None or len(boxes) == 0:
        return sample
    keep = ((boxes[:, 2] - boxes[:, 0]) >= min_side) & ((boxes[:, 3] - boxes[:, 1]) >= min_side)
    if keep.all():
        return sample
    n = len(boxes)
    for key in [k for k in sample if k.startswith("gt_") or k in ("is_crowd", "difficult")]:
        if isinstance(sample[key], np.ndarray) and len(sample[key]) == n:
            sample[key] = sample[key][keep]
    return sample


class SeededSamples:
    """Map-style view of a ppdet dataset whose keys are (epoch, position, index): seeds, then loads.

    Picklable, so loader worker processes get it too. The dataset's epoch is set from the key, so
    Mosaic/MixUp grouping follows the epoch of the sample, never a stale one.
    """

    def __init__(self, dataset, seed: int, min_box_side: float = 0.0):
        self.dataset = dataset
        self.seed = seed
        self.min_box_side = min_box_side

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, pos, idx = key
        self.dataset._epoch = epoch
        seed_python_numpy(derive_seed(self.seed, "sample", epoch, pos))
        sample = self.dataset[idx]
        if self.min_box_side > 0:
            sample = drop_slivers(sample, self.min_box_side)
        sample["_dk_batch_seed"] = (epoch, pos)
        return sample


class SeededCollate:
    """ppdet's batch transforms (BatchRandomResize, ...) seeded by (seed, epoch, first position)."""

    def __init__(self, batch_transforms, seed: int):
        self.batch_transforms = batch_transforms
        self.seed = seed

    def __call__(self, samples: list[dict]):
        keys = [s.pop("_dk_batch_seed") for s in samples]
        seed_python_numpy(derive_seed(self.seed, "batch", *keys[0]))
        return pad_empty_batch(self.batch_transforms(samples))


GT_FIELDS = ("gt_bbox", "gt_class", "pad_gt_mask", "is_crowd", "difficult", "gt_score")


def pad_empty_batch(batch):
    """A batch of only defect-free images gets one all-padding box slot (mask 0) per image.

    ppdet's PadGT leaves such a batch with zero box slots, and PP-YOLOE's ATSS assigner then returns 3
    values instead of 4 ("not enough values to unpack"); lines with many good parts hit this often.
    """
    if not isinstance(batch, dict) or "gt_bbox" not in batch or np.shape(batch["gt_bbox"])[1:2] != (0,):
        return batch
    for key in GT_FIELDS:
        value = batch.get(key)
        if isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[1] == 0:
            batch[key] = np.zeros((value.shape[0], 1, value.shape[2]), dtype=value.dtype)
    return batch


class SeededLoader:
    """Drop-in for ppdet's ``trainer.loader``: ``len()``, ``.dataset``, one pass per ``iter()``.

    With several training processes (``paddle.distributed.launch``) rank r takes every ``nranks``-th batch
    of the same epoch order, so the ranks see disjoint data and the union does not depend on the count.
    """

    def __init__(self, dataset, batch_transforms, batch_size: int, seed: int, drop_last: bool = True,
                 shuffle: bool = True, workers: int = 0, min_box_side: float = 0.0, rank: int = 0,
                 nranks: int = 1):
        self.dataset = dataset
        self.batch_transforms = batch_transforms
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.workers = workers
        self.min_box_side = min_box_side
        self.rank = rank
        self.nranks = max(1, nranks)

    def __len__(self) -> int:
        """Batches per epoch of this process."""
        return self.total_batches() // self.nranks

    def total_batches(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        """The keys of every batch of ``epoch`` (a pure function of seed and epoch)."""
        n = len(self.dataset)
        order = epoch_order(self.seed, epoch, n) if self.shuffle else np.arange(n)
        keys = [(epoch, pos, int(idx)) for pos, idx in enumerate(order)]
        size = self.batch_size
        return [keys[b * size:(b + 1) * size] for b in range(self.total_batches())]

    def rank_batches(self, epoch: int) -> list[list[tuple[int, int, int]]]:
        return self.batches(epoch)[self.rank::self.nranks][:len(self)]

    def samples(self) -> SeededSamples:
        return SeededSamples(self.dataset, self.seed, self.min_box_side)

    def loader(self, epoch: int):
        from detect.heavy import paddle_stack

        paddle = paddle_stack().paddle
        return paddle.io.DataLoader(
            dataset=self.samples(), batch_sampler=self.rank_batches(epoch),
            collate_fn=SeededCollate(self.batch_transforms, self.seed), num_workers=self.workers,
            return_list=False, use_shared_memory=False)

    def __iter__(self):
        # ppdet calls dataset.set_epoch(epoch) right before iterating: that is the epoch to load
        return iter(self.loader(int(self.dataset._epoch)))


def install_seeded_loader(trainer, seed: int, workers: int = 0, min_box_side: float = 0.0) -> SeededLoader:
    """Replace ppdet's train loader (and stop the prefetch thread it already started)."""
    reader = trainer.loader
    _shutdown(getattr(reader, "loader", None))
    loader = SeededLoader(reader.dataset, reader._batch_transforms, reader.batch_size, seed,
                          drop_last=reader.drop_last, shuffle=reader.shuffle, workers=workers,
                          min_box_side=min_box_side, rank=trainer._local_rank, nranks=trainer._nranks)
    trainer.loader = loader
    return loader


def _shutdown(iterator) -> None:
    """Stop a paddle DataLoader iterator's prefetch thread/workers (it draws from the global generators)."""
    if iterator is None:
        return
    thread = getattr(iterator, "_thread", None)
    queue = getattr(iterator, "_blocking_queue", None)
    done = getattr(iterator, "_thread_done_event", None)
    if thread is not None and queue is not None and done is not None:  # single-process iterator: fast path
        done.set()
        queue.close()
        thread.join(timeout=10)
        iterator._thread = None
        iterator._blocking_queue = None
        iterator._shutdown = True
        return
    iterator._try_shutdown_all()
