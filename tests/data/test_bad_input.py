"""Bad input: a clear error naming shard and sample by default; with on_error=skip, counted and logged."""
from __future__ import annotations

import json
import logging
import re
import struct

import numpy as np
import pytest

from eqv2.data import DataConfig, SampleError, ShardError, TrainStream, val_batches
from eqv2.data.format import encode_sample, sample_key

from .conftest import oc20_frames, with_energy, write_uneven


def _raw_member(sample: dict, drop: str | None = None) -> bytes:
    """Sample bytes that bypass the writer's checks (as a buggy or foreign writer might produce)."""
    good = encode_sample(sample)
    (hlen,) = struct.unpack_from("<Q", good)
    header = json.loads(good[8 : 8 + hlen])
    body = bytearray(good[8 + hlen :])
    if drop:
        del header[drop]
    return struct.pack("<Q", len(json.dumps(header).encode())) + json.dumps(header).encode() + bytes(body)


def _nan_member(sample: dict) -> bytes:
    good = bytearray(encode_sample(sample))
    (hlen,) = struct.unpack_from("<Q", good)
    header = json.loads(good[8 : 8 + hlen])
    start = 8 + hlen + header["forces"]["data_offsets"][0]
    good[start : start + 4] = np.float32(np.nan).tobytes()
    return bytes(good)


def _wrong_shape_member(sample: dict) -> bytes:
    s = dict(sample)
    good = encode_sample(s)
    (hlen,) = struct.unpack_from("<Q", good)
    header = json.loads(good[8 : 8 + hlen])
    header["forces"]["shape"] = [len(s["numbers"]) * 3]  # flattened forces: right bytes, wrong shape
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + good[8 + hlen :]


@pytest.fixture(scope="module")
def samples():
    return with_energy(oc20_frames(24, seed=7))


CASES = {
    "missing": (lambda s: _raw_member(s, drop="positions"), "missing field 'positions'"),
    "nan": (_nan_member, "field 'forces' contains NaN"),
    "shape": (_wrong_shape_member, "field 'forces' has shape"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_sample_raises_then_skips(tmp_path, samples, case, caplog):
    make, msg = CASES[case]
    bad = sample_key(samples[9]["sid"], samples[9]["fid"])
    write_uneven(tmp_path, samples, [6, 6, 6, 6], payloads={bad: make(samples[9])})
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=1)
    with pytest.raises(SampleError, match=f"shard .*shard-000001.tar sample {bad}: {msg}"):
        list(TrainStream(cfg, 0, 1).epoch_batches(0))
    skip = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=1, on_error="skip")
    stream = TrainStream(skip, 0, 1)
    with caplog.at_level(logging.INFO, logger="eqv2.data"):
        ids = [i for b in stream.epoch_batches(0) for i in b.ids]
    assert len(ids) == 23 and bad not in ids and stream.skipped == 1
    assert any(bad in r.getMessage() for r in caplog.records)
    assert any("1 bad samples skipped" in r.getMessage() for r in caplog.records)


def _good_shards(tmp_path, samples):
    write_uneven(tmp_path, samples, [6, 6, 6, 6])
    return tmp_path / "shard-000002.tar"


def test_truncated_tar(tmp_path, samples):
    shard = _good_shards(tmp_path, samples)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    cfg = dict(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=0)
    with pytest.raises(ShardError, match=r"shard-000002.tar: sha256 .* differs from the manifest"):
        list(TrainStream(DataConfig(**cfg), 0, 1).epoch_batches(0))
    with pytest.raises(ShardError, match=r"shard-000002.tar: truncated or corrupt tar after sample \d+_\d"):
        list(TrainStream(DataConfig(**cfg, verify_checksums=False), 0, 1).epoch_batches(0))


def test_corrupt_bytes_checksum_and_decode(tmp_path, samples):
    shard = _good_shards(tmp_path, samples)
    data = bytearray(shard.read_bytes())
    data[512 + 9 : 512 + 14] = b"\xff\xfe\x00\x01\x02"  # inside the first member's JSON header
    shard.write_bytes(bytes(data))
    cfg = dict(val_manifest=str(tmp_path / "manifest.json"), train_manifest=str(tmp_path / "manifest.json"),
               batch_size=3, num_workers=0)
    with pytest.raises(ShardError, match="shard-000002.tar: sha256"):
        list(val_batches(DataConfig(**cfg), 0, 1))
    with pytest.raises(SampleError, match=r"shard-000002.tar sample \d+_\d: cannot decode"):
        list(val_batches(DataConfig(**cfg, verify_checksums=False), 0, 1))


def test_checksum_mismatch_skip_counts_whole_shard(tmp_path, samples):
    shard = _good_shards(tmp_path, samples)
    data = bytearray(shard.read_bytes())
    data[-2000] ^= 0xFF  # damage the tar padding: the samples decode, the checksum does not match
    shard.write_bytes(bytes(data))
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=4, num_workers=0, on_error="skip")
    stream = TrainStream(cfg, 0, 1)
    ids = [i for b in stream.epoch_batches(0) for i in b.ids]
    assert len(ids) == 18 and stream.skipped == 6
    # with one structure per batch, dropping a shard leaves batches empty: the ranks would fall out of
    # step, so this is refused loudly rather than handled by yielding fewer batches on this rank
    one = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=1, num_workers=0, on_error="skip")
    with pytest.raises(SampleError, match="dropped every sample of a batch, so the ranks cannot stay in step"):
        list(TrainStream(one, 0, 1).epoch_batches(0))


def test_missing_shard_file(tmp_path, samples):
    shard = _good_shards(tmp_path, samples)
    shard.unlink()
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=0)
    with pytest.raises(ShardError, match="shard-000002.tar: cannot read"):
        list(TrainStream(cfg, 0, 1).epoch_batches(0))


def test_url_not_in_manifest(tmp_path, samples):
    _good_shards(tmp_path, samples)
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), train_shards=str(tmp_path / "other-{000..001}.tar"),
                     batch_size=2, num_workers=0)
    with pytest.raises(ShardError, match="other-000.tar' names no shard of the manifest"):
        TrainStream(cfg, 0, 1)


def test_brace_pattern_and_pipe_urls(tmp_path, samples):
    _good_shards(tmp_path, samples)
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=0,
                     train_shards=f"pipe:cat {tmp_path}/shard-{{000000..000003}}.tar")
    ids = [i for b in TrainStream(cfg, 0, 1).epoch_batches(0) for i in b.ids]
    assert sorted(ids) == sorted(sample_key(s["sid"], s["fid"]) for s in samples)


def _force_offset(sample: dict) -> int:
    """Byte offset of the first force component's float32 inside the sample's member."""
    member = encode_sample(sample)
    (hlen,) = struct.unpack_from("<Q", member)
    return 8 + hlen + json.loads(member[8 : 8 + hlen])["forces"]["data_offsets"][0]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_labels_checked_at_decode(tmp_path, samples, num_workers):
    """An absurd energy (written by a writer without bounds) and a force with a flipped byte (shard
    damaged after writing, checksums off) are named by shard and sample, in the trainer's process even
    when a DataLoader worker found them (one line, no worker traceback); skipped and counted on request."""
    huge = dict(samples[9], energy=1e30)
    write_uneven(tmp_path, [huge if k == 9 else s for k, s in enumerate(samples)], [6, 6, 6, 6])
    cfg = dict(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=num_workers)
    key = sample_key(huge["sid"], huge["fid"])
    with pytest.raises(SampleError) as err:
        list(TrainStream(DataConfig(**cfg), 0, 1).epoch_batches(0))
    assert re.fullmatch(rf"shard \S+/shard-000001.tar sample {key}: \|energy\| per atom is [\d.e+]+ eV "
                        rf"\(energy 1e\+30 eV, \d+ atoms\), above the bound of 100 eV \(if real, raise "
                        rf"--max-energy-per-atom when sharding, data.max_energy_per_atom when training\)", str(err.value))
    ids = [i for b in TrainStream(DataConfig(**cfg, max_energy_per_atom=1e30), 0, 1).epoch_batches(0) for i in b.ids]
    assert key in ids and len(ids) == 24

    shard = tmp_path / "shard-000003.tar"
    data = bytearray(shard.read_bytes())
    victim = samples[18]  # the first sample of shard 3
    start = data.index(encode_sample(victim)) + _force_offset(victim)
    data[start + 3] = 0x45  # the float's sign/exponent byte: its value becomes thousands of eV/Å
    shard.write_bytes(bytes(data))
    value = abs(float(np.frombuffer(bytes(data[start : start + 4]), "<f4")[0]))
    assert value > 100
    key = sample_key(victim["sid"], victim["fid"])
    cfg.update(max_energy_per_atom=1e30, verify_checksums=False)
    with pytest.raises(SampleError, match=rf"^shard \S+/shard-000003.tar sample {key}: force component "
                                          rf"{value:.4g} eV/Å on atom 0, above the bound 100 eV/Å \(if real"):
        list(TrainStream(DataConfig(**cfg), 0, 1).epoch_batches(0))
    stream = TrainStream(DataConfig(**cfg, on_error="skip"), 0, 1)
    ids = [i for b in stream.epoch_batches(0) for i in b.ids]
    assert key not in ids and len(ids) == 23 and stream.skipped == 1
    ids = [i for b in TrainStream(DataConfig(**cfg, max_force=1e5), 0, 1).epoch_batches(0) for i in b.ids]
    assert key in ids


def test_sample_without_forces_is_bad_input(tmp_path, samples):
    """Shards written without forces (by an older writer) are refused per sample, not at a later step."""
    bare = dict(samples[4], forces=None)
    write_uneven(tmp_path, [bare if k == 4 else s for k, s in enumerate(samples)], [6, 6, 6, 6])
    key = sample_key(bare["sid"], bare["fid"])
    cfg = dict(train_manifest=str(tmp_path / "manifest.json"), val_manifest=str(tmp_path / "manifest.json"),
               batch_size=2, num_workers=0)
    with pytest.raises(SampleError, match=rf"shard-000000.tar sample {key}: no forces \(eqv2 trains on energies"):
        list(TrainStream(DataConfig(**cfg), 0, 1).epoch_batches(0))
    with pytest.raises(SampleError, match=rf"sample {key}: no forces"):
        list(val_batches(DataConfig(**cfg), 0, 1))
    stream = TrainStream(DataConfig(**cfg, on_error="skip"), 0, 1)
    batches = list(stream.epoch_batches(0))
    assert all(b.forces is not None and b.energy is not None for b in batches) and stream.skipped == 1


def test_skip_counts_as_they_happen_and_across_resume(tmp_path, samples):
    """take_skipped() reports skips with the batches that had them (the step logger's interval count);
    the running total is part of the stream state, and a state without it (older checkpoints) loads."""
    bad = {sample_key(s["sid"], s["fid"]): _nan_member(s) for s in (samples[1], samples[20])}
    write_uneven(tmp_path, samples, [6, 6, 6, 6], payloads=bad)
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), batch_size=2, num_workers=1,
                     shuffle_buffer=1, on_error="skip")
    stream = TrainStream(cfg, 0, 1)
    per_batch = []
    for b in stream.epoch_batches(0):
        per_batch.append(stream.take_skipped())
        if len(per_batch) == 6:
            state = stream.state_dict()
    assert sum(per_batch) == 2 and per_batch.count(1) == 2 and stream.skipped_total == 2
    assert state["skipped_total"] == sum(per_batch[:6])
    resumed = TrainStream(cfg, 0, 1)
    resumed.load_state_dict(state)
    list(resumed.epoch_batches(0))
    assert resumed.skipped_total == 2 and resumed.take_skipped() == 2 - state["skipped_total"]
    old = {k: v for k, v in state.items() if k != "skipped_total"}  # a checkpoint written before the count
    older = TrainStream(cfg, 0, 1)
    older.load_state_dict(old)
    assert older.skipped_total == 0 and older.state_dict()["step"] == 6


def test_worker_error_is_the_samples_own_line(tmp_path, samples):
    """A bad sample met in a DataLoader worker raises in the trainer with the sample's own message (the
    DataLoader alone would re-raise it with the worker's traceback as a many-line message)."""
    bad = sample_key(samples[9]["sid"], samples[9]["fid"])
    write_uneven(tmp_path, samples, [6, 6, 6, 6], payloads={bad: _nan_member(samples[9])})
    cfg = DataConfig(train_manifest=str(tmp_path / "manifest.json"), val_manifest=str(tmp_path / "manifest.json"),
                     batch_size=2, num_workers=2)
    for batches in (TrainStream(cfg, 0, 1).epoch_batches(0), val_batches(cfg, 0, 1)):
        with pytest.raises(SampleError) as err:
            list(batches)
        assert re.fullmatch(rf"shard \S+/shard-000001.tar sample {bad}: field 'forces' contains NaN or inf",
                            str(err.value))
