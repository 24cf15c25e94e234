"""The epoch plan: which image goes in which batch, in which order, on which rank (pure).

From the scanned records and a few settings, `EpochPlanner.plan(epoch, world_size)` gives
every batch of that epoch. Everything is a function of (records, settings, seed, epoch),
so a run reproduces and resumes at an exact batch.

1. Copies per image.  weight = repeats x folder_repeats x multiply.  Each image gets
   floor(weight) copies; the fractional part is spent per folder: of the n images of a
   folder sharing a weight f + frac, round(frac x n) get one more copy, drawn afresh each
   epoch. The number of samples per epoch is therefore the same every epoch.
   Regularisation images (kohya's reg folder) get their copies by the same rule, and
   those are then cycled or cut to exactly the number of training copies N: each reg
   copy N // M times, plus N mod M copies drawn afresh each epoch. Those are shared out
   to the buckets in proportion to their reg copies, not at random, so a bucket's sample
   count (and batch count) does not change from epoch to epoch. Reg copies share batches
   with the training copies of their bucket (kohya's mix), so an epoch holds 2N samples.
2. Buckets.  Each image sits in its nearest-aspect bucket. Within a bucket the copies are
   laid out round by round (every image once, shuffled, then every image with a second
   copy, ...), so copies of one image rarely share a batch.
3. Batches.  Each bucket is cut into batches of `batch_size`. The last partial batch is
   filled with other images of the same bucket drawn at random ("fill", the default),
   dropped ("drop"), or kept short ("keep", for validation).
4. Ranks.  The batch count is made a multiple of world_size (extra batches of random
   images with "fill"/"keep", the last batches dropped with "drop"), the batch order is
   shuffled, and rank r takes batches r, r + W, r + 2W, ...: disjoint whole batches and
   the same number of steps on every rank.
"""
from __future__ import annotations

import hashlib
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from ldm.data.buckets import Bucket, nearest_bucket
from ldm.data.scan import ImageRecord

INCOMPLETE_POLICIES = ("fill", "drop", "keep")


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any tuple of plain values (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _rng(*parts: object) -> random.Random:
    return random.Random(derive_seed(*parts))


@dataclass(frozen=True)
class Batch:
    bucket: Bucket
    items: tuple[int, ...]  # indices into the planner's records
    fills: int = 0          # the last `fills` items repeat images beyond their planned copies


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    world_size: int
    batches: tuple[Batch, ...]  # global order; rank r takes batches[r::world_size]
    samples: int                # planned copies of images, fills not included
    fills: int                  # items added to complete batches (partial batches and rank padding)
    dropped: int                # planned copies left out ("drop" only)
    pad_batches: int            # whole batches added ("fill"/"keep") so every rank gets as many

    @property
    def steps(self) -> int:
        """Batches per rank."""
        return len(self.batches) // self.world_size

    def for_rank(self, rank: int) -> tuple[Batch, ...]:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world_size {self.world_size}")
        return self.batches[rank::self.world_size]


def split_validation(records: Sequence[ImageRecord], val_split: float,
                     seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held_out): the round(val_split x n) images with the smallest hash of
    (seed, path), at least one when val_split > 0, never all of them.

    Ranking by a per-path hash keeps the split stable when files are added or removed:
    an image stays on its side unless it sits at the boundary.
    """
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split: expected a fraction in [0, 1), got {val_split}")
    n = len(records)
    k = min(max(1, math.floor(val_split * n + 0.5)), n - 1) if val_split > 0 and n > 1 else 0
    ranked = sorted(range(n), key=lambda i: derive_seed(seed, "val_split", records[i].path))
    held = set(ranked[:k])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])


def apportion(total: int, sizes: Sequence[int]) -> list[int]:
    """`total` split in proportion to `sizes` (largest remainders, ties to the first):
    whole numbers that sum to `total` (all 0 when the sizes sum to 0)."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    shares, rests = zip(*(divmod(total * n, whole) for n in sizes))
    shares = list(shares)
    for k in sorted(range(len(sizes)), key=lambda k: -rests[k])[:total - sum(shares)]:
        shares[k] += 1
    return shares


def take_fraction(records: Sequence[ImageRecord], fraction: float, seed: int) -> list[ImageRecord]:
    """A stable seeded subset of round(fraction x n) records (at least one), in path order."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"repeats: for validation, expected a fraction in (0, 1], got {fraction}")
    n = len(records)
    k = max(1, math.floor(fraction * n + 0.5)) if n else 0
    ranked = sorted(range(n), key=lambda i: derive_seed(seed, "fraction", records[i].path))
    keep = set(ranked[:k])
    return [r for i, r in enumerate(records) if i in keep]


class EpochPlanner:
    """Plans epochs over fixed records; cheap to pickle (records and bucket choices only)."""

    def __init__(self, records: Sequence[ImageRecord], buckets: Sequence[Bucket], batch_size: int,
                 repeats: float = 1.0, seed: int = 555, incomplete: str = "fill",
                 use_folder_weights: bool = True, reg_records: Sequence[ImageRecord] = ()):
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if not repeats > 0:
            raise ValueError(f"repeats: expected > 0, got {repeats}")
        if incomplete not in INCOMPLETE_POLICIES:
            raise ValueError(f"incomplete: expected one of {INCOMPLETE_POLICIES}, got {incomplete!r}")
        self.records = list(records) + list(reg_records)
        self.n_train = len(records)  # records[n_train:] are regularisation images
        self.batch_size, self.repeats, self.seed = batch_size, float(repeats), seed
        self.incomplete, self.use_folder_weights = incomplete, use_folder_weights
        self.bucket_of = [nearest_bucket(r.width, r.height, buckets) for r in self.records]
        self.members: dict[Bucket, list[int]] = defaultdict(list)  # bucket -> record indices
        for i, b in enumerate(self.bucket_of):
            self.members[b].append(i)
        self.buckets = sorted(self.members, key=lambda b: (-len(self.members[b]), b))

    def weight(self, i: int) -> float:
        r = self.records[i]
        return self.repeats * (r.folder_repeats * r.multiply if self.use_folder_weights else 1.0)

    def is_reg(self, i: int) -> bool:
        return i >= self.n_train

    def own_counts(self, epoch: int) -> list[int]:
        """Copies of each record from its weight alone (step 1 of the module notes), before
        the regularisation copies are matched to the training count."""
        counts = [0] * len(self.records)
        groups: dict[tuple[bool, str, float], list[int]] = defaultdict(list)
        for i, r in enumerate(self.records):
            groups[(self.is_reg(i), r.folder, self.weight(i))].append(i)
        for (reg, folder, w), idx in groups.items():
            base = math.floor(w + 1e-9)
            extra = math.floor(max(w - base, 0.0) * len(idx) + 0.5)
            rng = _rng(self.seed, "reg_extra" if reg else "extra", epoch, folder, w)
            chosen = set(rng.sample(idx, extra)) if extra else set()
            for i in idx:
                counts[i] = base + (i in chosen)
        return counts

    def counts(self, epoch: int) -> list[int]:
        """Copies of each record in this epoch, regularisation copies matched to the training count."""
        counts = self.own_counts(epoch)
        if self.n_train == len(self.records):
            return counts
        copies = {b: [i for i in self.members[b] if self.is_reg(i) for _ in range(counts[i])] for b in self.buckets}
        target = sum(counts[:self.n_train])
        for b, share in zip(self.buckets, apportion(target, [len(copies[b]) for b in self.buckets])):
            if not copies[b]:
                continue
            full, rest = divmod(share, len(copies[b]))
            for i in set(copies[b]):
                counts[i] *= full
            for i in _rng(self.seed, "reg", epoch, tuple(b)).sample(copies[b], rest):
                counts[i] += 1
        return counts

    def samples_per_epoch(self) -> int:
        return sum(self.counts(0))

    def plan(self, epoch: int, world_size: int = 1) -> EpochPlan:
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        counts = self.counts(epoch)
        batches: list[Batch] = []
        fills = dropped = 0
        for bucket in self.buckets:
            order = self._bucket_order(bucket, counts, epoch)
            rng = _rng(self.seed, "fill", epoch, tuple(bucket))
            for start in range(0, len(order), self.batch_size):
                items = order[start:start + self.batch_size]
                missing = self.batch_size - len(items)
                if missing and self.incomplete == "drop":
                    dropped += len(items)
                    continue
                if missing and self.incomplete == "fill":
                    items += self._draw(rng, bucket, missing, exclude=set(items))
                    fills += missing
                batches.append(Batch(bucket, tuple(items), missing if self.incomplete == "fill" else 0))
        rng = _rng(self.seed, "ranks", epoch, world_size)
        extra = -len(batches) % world_size
        pad_batches = 0
        if extra and self.incomplete == "drop":
            rng.shuffle(batches)
            for b in batches[len(batches) - (world_size - extra):]:
                dropped += len(b.items)
            del batches[len(batches) - (world_size - extra):]
        elif extra and batches:
            sizes = [len(self.members[b]) for b in self.buckets]
            for _ in range(extra):
                bucket = rng.choices(self.buckets, weights=sizes)[0]
                batches.append(Batch(bucket, tuple(self._draw(rng, bucket, self.batch_size, set())),
                                     self.batch_size))
            fills += extra * self.batch_size
            pad_batches = extra
        rng.shuffle(batches)
        return EpochPlan(epoch=epoch, world_size=world_size, batches=tuple(batches), samples=sum(counts),
                         fills=fills, dropped=dropped, pad_batches=pad_batches)

    def _bucket_order(self, bucket: Bucket, counts: list[int], epoch: int) -> list[int]:
        rng = _rng(self.seed, "order", epoch, tuple(bucket))
        members = self.members[bucket]
        order: list[int] = []
        for round_ in range(max((counts[i] for i in members), default=0)):
            this_round = [i for i in members if counts[i] > round_]
            rng.shuffle(this_round)
            order += this_round
        return order

    def _draw(self, rng: random.Random, bucket: Bucket, k: int, exclude: set[int]) -> list[int]:
        """k random images of the bucket, distinct and outside `exclude` while the bucket allows."""
        pool = [i for i in self.members[bucket] if i not in exclude]
        if len(pool) >= k:
            return rng.sample(pool, k)
        return pool + rng.choices(self.members[bucket], k=k - len(pool))
