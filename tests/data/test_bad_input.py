"""Bad input: a clear error naming shard and sample by default; with on_error=skip, counted and logged."""
from __future__ import annotations

import json
import logging
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
