"""Reading one shard: open (WebDataset `gopen`: local paths, `pipe:` commands, URLs), verify its
sha256 against the manifest, iterate its tar members (WebDataset's tar iterator), decode samples.

Every problem becomes a `ShardError`/`SampleError` naming the shard and the sample key.  With
on_error="skip" a bad sample becomes a `None` placeholder plus a message instead, so the caller
counts it and keeps its positions (and hence batch boundaries) unchanged.
"""
from __future__ import annotations

import hashlib
import io
import re

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tar_file_iterator

from eqv2.data.format import EXTENSION, SampleError, decode_sample, sample_key
from eqv2.data.manifest import Manifest, ShardInfo, load_manifest
from eqv2.data.validate import LabelBounds, check_labels


class ShardError(SampleError):
    """A whole shard is unreadable, truncated, or differs from its manifest entry."""


def resolve_shards(manifest_path: str, shards: str) -> tuple[list[str], list[ShardInfo], Manifest]:
    """URLs and manifest entries of the shards to read.

    `shards` == "" reads every shard of the manifest from the manifest's directory; otherwise it is
    a WebDataset URL spec (brace patterns, "::" lists, `pipe:` commands) and each URL is matched to
    its manifest entry by the `*.tar` file name it contains.
    """
    manifest = load_manifest(manifest_path)
    if not shards:
        base = manifest.path.parent
        return [str(base / s.name) for s in manifest.shards], list(manifest.shards), manifest
    by_name = {s.name: s for s in manifest.shards}
    urls, infos = [], []
    for url in expand_urls(shards):
        names = re.findall(r"([^/\s:]+\.tar)\b", url)
        if not names or names[-1] not in by_name:
            raise ShardError(f"shard URL {url!r} names no shard of the manifest {manifest_path}")
        urls.append(url)
        infos.append(by_name[names[-1]])
    if len({i.name for i in infos}) != len(infos):
        raise ShardError(f"the shard list {shards!r} names a shard twice")
    return urls, infos, manifest


def _fail(msg: str, on_error: str, errors: list[str], cls=ShardError) -> None:
    if on_error != "skip":
        raise cls(msg)
    errors.append(msg)


def read_shard(url: str, info: ShardInfo, verify: bool, on_error: str,
               bounds: LabelBounds | None = LabelBounds()) -> tuple[list[dict | None], list[str]]:
    """Exactly `info.count` entries in tar order: a decoded sample, or None where one was skipped.

    Each sample is checked as `decode_sample` does and, unless `bounds` is None, its labels by
    `check_labels` (present, finite, within bounds), as when the shard was written."""
    errors: list[str] = []
    try:
        with gopen(url, "rb") as stream:
            data = stream.read()
    except Exception as err:  # noqa: BLE001 - any open/read failure is reported with the shard name
        _fail(f"shard {url}: cannot read: {err}", on_error, errors)
        return [None] * info.count, errors
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            _fail(f"shard {url}: sha256 {digest[:16]}... differs from the manifest's {info.sha256[:16]}... "
                  f"(corrupt, truncated or replaced shard)", on_error, errors)
            return [None] * info.count, errors
    samples: list[dict | None] = []
    last = "<start of shard>"
    tar_failed = False
    try:
        for member in tar_file_iterator(io.BytesIO(data)):
            key, _, ext = member["fname"].partition(".")
            where = f"shard {url} sample {key}"
            if len(samples) >= info.count:
                _fail(f"shard {url}: more samples than the manifest's {info.count} (extra: {key})", on_error, errors)
                break
            try:
                if ext != EXTENSION:
                    raise SampleError(f"{where}: unexpected member {member['fname']!r} (want <key>.{EXTENSION})")
                sample = decode_sample(member["data"], where)
                if sample_key(sample["sid"], sample["fid"]) != key:
                    raise SampleError(f"{where}: holds sid/fid {sample['sid']}/{sample['fid']}, not its key")
                if bounds is not None:
                    check_labels(sample, where, bounds)
                samples.append(sample)
            except SampleError as err:
                _fail(str(err), on_error, errors, SampleError)
                samples.append(None)
            last = key
    except SampleError:
        raise
    except Exception as err:  # noqa: BLE001 - tarfile raises several types for damaged archives
        tar_failed = True
        _fail(f"shard {url}: truncated or corrupt tar after sample {last}: {err}", on_error, errors)
    if len(samples) < info.count:
        if not tar_failed:
            _fail(f"shard {url}: {len(samples)} samples, the manifest says {info.count}", on_error, errors)
        samples.extend([None] * (info.count - len(samples)))
    return samples, errors
