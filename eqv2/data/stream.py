"""Training and validation batch streams over sharded data: the API the trainer calls.

    stream = TrainStream(cfg, rank, world_size, prepare)   # prepare: AtomsBatch -> AtomsBatch, in the workers
    for epoch in range(start_epoch, epochs):
        for batch in stream.epoch_batches(epoch):     # AtomsBatch; stream.steps_in_epoch(epoch) of them
            ...                                        # checkpoint may store stream.state_dict()
    stream.load_state_dict(state)                      # after a restart: continue mid-epoch exactly
    for batch in val_batches(cfg, rank, world_size, prepare):  # every val sample once over all ranks
        ...

Each rank reads its own slots (one per DataLoader worker, see `eqv2.data.plan`) and every slot yields
the same number of batches, so all ranks take `steps_in_epoch(epoch)` steps whatever the shard sizes.
The DataLoader hands out worker results strictly round-robin; rank step j therefore comes from local
slot j mod W', so the data position is (epoch, step j, each slot's next sample position), a few numbers.  To resume
the workers are rotated so that worker 0 serves slot j mod W', and each slot reloads the one shuffle
group holding its next sample.  The state is tiny and resume costs one group read per worker.
"""
from __future__ import annotations

import gc
import hashlib
import logging
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from eqv2.batch import AtomsBatch
from eqv2.data.config import DataConfig
from eqv2.data.format import SampleError, sample_key
from eqv2.data.manifest import ShardInfo
from eqv2.data.plan import EpochPlan, SlotPlan, group_permutation, pack_order, plan_epoch, starts_new_batch
from eqv2.data.reader import read_shard, resolve_shards

log = logging.getLogger("eqv2.data")
_MAX_LOGGED = 5


class _SlotReader:
    """Picklable description of what one rank reads in one epoch; iterates one slot's batches."""

    def __init__(self, urls: list[str], infos: list[ShardInfo], plan: EpochPlan, slots: list[SlotPlan],
                 cfg: DataConfig, shuffle: bool, prepare: Callable[[AtomsBatch], AtomsBatch] | None) -> None:
        self.urls, self.infos, self.plan, self.slots = urls, infos, plan, slots
        self.prepare = prepare  # e.g. the trainer's GraphBuilder; runs in the worker, after collation
        self.seed, self.shuffle = cfg.seed, shuffle
        self.verify, self.on_error, self.bounds = cfg.verify_checksums, cfg.on_error, cfg.label_bounds
        self.batch_size, self.max_atoms = cfg.batch_size, cfg.max_atoms
        self.pack = shuffle and cfg.max_atoms > 0 and cfg.pack_batches  # training batches by atoms

    def batches(self, local: int, start: int, pos: tuple[int, int]) -> Iterator[tuple]:
        """Batches start..K-1 of local slot `local`, whose next sample is at position pos = (p, c).

        Yields (batch, local, next position, samples skipped since the previous batch, messages).
        """
        slot, k = self.slots[local], self.plan.num_batches
        offsets, atom_offsets, i0, a0 = [], [], 0, 0  # first sample position and atoms before each group
        for g0, g1 in slot.groups:
            offsets.append(i0)
            atom_offsets.append(a0)
            i0 += sum(self.infos[slot.shards[q]].count for q in range(g0, g1))
            a0 += sum(self.infos[slot.shards[q]].atoms for q in range(g0, g1))
        b, members, atoms, skipped, messages = start, [], 0, 0, []
        first = max(g for g, i in enumerate(offsets) if i <= pos[0]) if pos[0] < slot.samples else len(offsets)
        cum = pos[1]
        for g in range(first, len(slot.groups)):
            g0, g1 = slot.groups[g]
            group: list[dict | None] = []
            for q in range(g0, g1):
                samples, errors = read_shard(self.urls[slot.shards[q]], self.infos[slot.shards[q]],
                                             self.verify, self.on_error, self.bounds)
                group.extend(samples)
                messages.extend(errors[:_MAX_LOGGED])
            order = group_permutation(self.seed, self.plan.epoch, slot.slot, g, len(group), self.shuffle).tolist()
            if self.pack:  # batches end near their atom marks: ranks' batches alike (eqv2.data.plan, 4.)
                sizes = [len(sample["numbers"]) if sample is not None else 0 for sample in group]
                order = pack_order(order, sizes, atom_offsets[g], slot.atoms, k)
            for position, j in enumerate(order, start=offsets[g]):
                if position < pos[0]:
                    continue
                sample = group[j]
                if sample is None:
                    skipped += 1
                    continue
                n = len(sample["numbers"])
                if starts_new_batch(slot, k, self.batch_size, self.max_atoms, b, len(members), atoms, position, cum, n):
                    batch, dropped = self._collate(members, atoms, messages)
                    yield batch, local, (position, cum), skipped + dropped, messages
                    b, members, atoms, skipped, messages = b + 1, [], 0, 0, []
                members.append(sample)
                atoms += n
                cum += n
        if members:
            batch, dropped = self._collate(members, atoms, messages)
            yield batch, local, (slot.samples, cum), skipped + dropped, messages
            b += 1
        if b != k:
            raise SampleError(
                f"slot {slot.slot} (shards {[self.urls[i] for i in slot.shards[:3]]}...) produced {b - start} of "
                f"its {k - start} remaining batches: on_error=skip dropped every sample of a batch, so the ranks "
                f"cannot stay in step; repair or remove the bad shards"
            )

    def _collate(self, samples: list[dict], atoms: int, messages: list[str]) -> tuple[AtomsBatch, int]:
        """(the batch of `samples`, prepared; how many samples were dropped).  `prepare` may reject one
        structure by raising a ValueError whose `structure` attribute is its index in the batch
        (GraphInputError: coinciding atoms, an atom without neighbours): with on_error=skip that sample
        is dropped, counted and its message appended to `messages`, like an undecodable one."""
        if self.max_atoms and atoms > self.max_atoms:  # guaranteed by the plan; checked because OOM is costly
            raise AssertionError(f"batch of {atoms} atoms exceeds max_atoms={self.max_atoms}")
        samples, dropped = list(samples), 0
        while True:
            batch = AtomsBatch.from_arrays(samples, ids=[sample_key(s["sid"], s["fid"]) for s in samples])
            if self.prepare is None:
                return batch, dropped
            try:
                return self.prepare(batch), dropped
            except ValueError as err:
                bad = getattr(err, "structure", None)
                if self.on_error != "skip" or bad is None:
                    raise
                if len(messages) < _MAX_LOGGED:
                    messages.append(str(err))
                del samples[bad]
                dropped += 1
                if not samples:
                    raise SampleError(f"every sample of a batch was rejected (last: {err}); on_error=skip cannot "
                                      f"keep the ranks in step without it: repair or remove these samples") from err


class _EpochDataset(IterableDataset):
    """DataLoader worker w serves local slot (w + rotation) mod W', from batch `starts[slot]` at `positions[slot]`."""

    def __init__(self, reader: _SlotReader, starts: list[int], positions: list[tuple[int, int]], rotation: int) -> None:
        self.reader, self.starts, self.positions, self.rotation = reader, starts, positions, rotation

    def __iter__(self):
        info = get_worker_info()
        local = 0 if info is None else (info.id + self.rotation) % len(self.reader.slots)
        batches = self.reader.batches(local, self.starts[local], self.positions[local])
        if info is None:
            return batches
        # a worker forked from a trainer that collects garbage on its own schedule
        # (gc.manual_every_steps) inherits automatic collection off; a worker collects automatically
        gc.enable()
        # one intra-op thread per loader process; never in the trainer itself (num_workers 0), whose
        # forward and backward would otherwise run on one core
        torch.set_num_threads(1)
        return _reporting(batches)


class _WorkerError:
    """Bad input found in a DataLoader worker, sent to the trainer as an item: raised there with its
    own one-line message (the DataLoader would re-raise it with the worker's traceback as the message)."""

    def __init__(self, err: ValueError) -> None:
        self.cls, self.message, self.structure = type(err), str(err), getattr(err, "structure", None)

    def raise_(self):
        err = self.cls(self.message)
        if self.structure is not None:
            err.structure = self.structure
        raise err


def _reporting(batches: Iterator[tuple]) -> Iterator:
    try:
        yield from batches
    except ValueError as err:  # SampleError/ShardError, or a structure `prepare` rejected (GraphInputError)
        if not isinstance(err, SampleError) and getattr(err, "structure", None) is None:
            raise
        yield _WorkerError(err)


def _identity(x):
    return x


def _slots_per_rank(cfg: DataConfig) -> int:
    return max(1, cfg.num_workers)


def _iterate(reader: _SlotReader, cfg: DataConfig, step: int, positions: list[tuple[int, int]]) -> Iterator[tuple]:
    n = len(reader.slots)
    starts = [max(0, (step - w + n - 1) // n) for w in range(n)]
    dataset = _EpochDataset(reader, starts, positions, step % n)
    if cfg.num_workers == 0:
        return iter(dataset)
    # on a GPU machine batches arrive in pinned memory: the trainer's non-blocking copy then overlaps
    # the GPU's work instead of waiting for it
    loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, collate_fn=_identity,
                        prefetch_factor=cfg.prefetch_factor, persistent_workers=False,
                        pin_memory=torch.cuda.is_available())
    return _raising(iter(loader))


def _raising(items: Iterator) -> Iterator[tuple]:
    for item in items:
        if isinstance(item, _WorkerError):
            item.raise_()
        yield item


class TrainStream:
    """Shuffled training batches for one rank; equal step counts on all ranks; exact resume."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int,
                 prepare: Callable[[AtomsBatch], AtomsBatch] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.cfg, self.rank, self.world_size, self.prepare = cfg, rank, world_size, prepare
        self.urls, self.infos, manifest = resolve_shards(cfg.train_manifest, cfg.train_shards)
        self._slots = _slots_per_rank(cfg)
        self._fingerprint = {
            "shards": hashlib.sha256("".join(i.sha256 for i in self.infos).encode()).hexdigest(),
            "world_size": world_size, "num_workers": cfg.num_workers, "seed": cfg.seed,
            "batch_size": cfg.batch_size, "max_atoms": cfg.max_atoms, "shuffle_buffer": cfg.shuffle_buffer,
        }
        if cfg.max_atoms:  # packing reorders batches by atoms only (checkpoints by structures are unaffected)
            self._fingerprint["pack_batches"] = cfg.pack_batches
        self._plans: dict[int, EpochPlan] = {}
        self._epoch, self._step = 0, 0
        self._positions = [(0, 0)] * self._slots  # next (sample position, atoms before it) of each local slot
        self.skipped = 0  # samples skipped (on_error=skip) in the last completed epoch
        self.skipped_total = 0  # ... since the run began (kept in the state: a resumed run continues it)
        self._untaken = 0  # ... since the last take_skipped()
        self.plan(0)  # configuration errors surface at construction, before any step

    def plan(self, epoch: int) -> EpochPlan:
        if epoch not in self._plans:
            self._plans = {epoch: plan_epoch(self.infos, self.world_size * self._slots, self.cfg.seed, epoch, True,
                                             self.cfg.batch_size, self.cfg.max_atoms, self.cfg.shuffle_buffer)}
        return self._plans[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        return self.plan(epoch).num_batches * self._slots

    def epoch_batches(self, epoch: int) -> Iterator[AtomsBatch]:
        if epoch != self._epoch:
            self._step, self._positions = 0, [(0, 0)] * self._slots
        self._epoch, start = epoch, self._step
        plan, total = self.plan(epoch), self.steps_in_epoch(epoch)
        mine = list(plan.slots[self.rank * self._slots : (self.rank + 1) * self._slots])
        reader = _SlotReader(self.urls, self.infos, plan, mine, self.cfg, shuffle=True, prepare=self.prepare)
        skipped = 0
        for batch, local, position, n_skipped, messages in _iterate(reader, self.cfg, start, list(self._positions)):
            skipped += n_skipped
            self.skipped_total += n_skipped
            self._untaken += n_skipped
            self._positions[local] = position
            for msg in messages:
                log.warning("skipped bad input: %s", msg)
            self._step += 1  # the position advances as the batch is handed out
            yield batch
        if self._step != total:
            raise RuntimeError(f"epoch {epoch}: rank {self.rank} got {self._step} of {total} batches")
        self.skipped = skipped
        (log.warning if skipped else log.info)("epoch %d rank %d: %d bad samples skipped", epoch, self.rank, skipped)
        self._epoch, self._step, self._positions = epoch + 1, 0, [(0, 0)] * self._slots

    def take_skipped(self) -> int:
        """Samples skipped (on_error=skip) in the batches handed out since the last call (the step logger's
        per-interval count)."""
        n, self._untaken = self._untaken, 0
        return n

    def state_dict(self) -> dict:
        """Data position: epoch, steps taken in it, and each local slot's next (sample, atoms) position;
        and the samples skipped so far."""
        return {"epoch": self._epoch, "step": self._step, "positions": [list(p) for p in self._positions],
                "fingerprint": dict(self._fingerprint), "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        theirs = state.get("fingerprint", {})
        for key, value in self._fingerprint.items():
            if theirs.get(key) != value:
                raise ValueError(
                    f"cannot resume the data stream exactly: {key} was {theirs.get(key)!r} in the checkpoint, "
                    f"now {value!r}"
                )
        self._epoch, self._step = int(state["epoch"]), int(state["step"])
        self._positions = [(int(p), int(c)) for p, c in state["positions"]]
        self.skipped_total = int(state.get("skipped_total", 0))  # absent in checkpoints written before it

    def close(self) -> None:
        """Nothing persistent to stop: workers live only while an epoch is iterated."""


def _val_reader(cfg: DataConfig, rank: int, world_size: int,
                prepare: Callable[[AtomsBatch], AtomsBatch] | None = None) -> tuple[_SlotReader, EpochPlan]:
    if not cfg.val_manifest:
        raise ValueError("data.val_manifest is not set")
    urls, infos, _ = resolve_shards(cfg.val_manifest, cfg.val_shards)
    n = _slots_per_rank(cfg)
    plan = plan_epoch(infos, world_size * n, cfg.seed, 0, False, cfg.batch_size, cfg.max_atoms, cfg.shuffle_buffer)
    return _SlotReader(urls, infos, plan, list(plan.slots[rank * n : (rank + 1) * n]), cfg, shuffle=False,
                       prepare=prepare), plan


def num_val_batches(cfg: DataConfig, world_size: int) -> int:
    """Batches `val_batches` yields on every rank (the same number on each)."""
    return _val_reader(cfg, 0, world_size)[1].num_batches * _slots_per_rank(cfg)


def val_batches(cfg: DataConfig, rank: int, world_size: int,
                prepare: Callable[[AtomsBatch], AtomsBatch] | None = None) -> Iterator[AtomsBatch]:
    """Every validation sample exactly once over all ranks, in a fixed order; equal counts per rank."""
    reader, _ = _val_reader(cfg, rank, world_size, prepare)
    skipped = 0
    for batch, _, _, n_skipped, messages in _iterate(reader, cfg, 0, [(0, 0)] * len(reader.slots)):
        skipped += n_skipped
        for msg in messages:
            log.warning("skipped bad validation input: %s", msg)
        yield batch
    if skipped:
        log.warning("validation rank %d: %d bad samples skipped", rank, skipped)
