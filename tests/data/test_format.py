import numpy as np
import pytest

from eqv2.batch import AtomsBatch
from eqv2.data.format import SampleError, decode_sample, encode_sample

from .conftest import oc20_frames, with_energy


def test_round_trip_exact_dtypes_and_shapes():
    s = with_energy(oc20_frames(1, seed=0))[0]
    out = decode_sample(encode_sample(s), "here")
    assert out["sid"] == s["sid"] and out["fid"] == s["fid"]
    np.testing.assert_array_equal(out["positions"], s["positions"].astype(np.float32))
    np.testing.assert_array_equal(out["numbers"], s["numbers"])
    np.testing.assert_array_equal(out["forces"], s["forces"].astype(np.float32))
    np.testing.assert_array_equal(out["fixed"], s["fixed"])
    assert out["energy"].shape == () and float(out["energy"]) == s["energy"]  # float64, exact
    assert float(out["ref_energy"]) == s["ref_energy"]
    batch = AtomsBatch.from_arrays([out, out], ids=["a", "b"])
    assert batch.pos.shape == (2 * len(s["numbers"]), 3) and batch.energy.dtype.is_floating_point


def test_optional_fields_absent():
    s = oc20_frames(1, seed=0)[0]
    for k in ("tags", "fixed", "forces", "total_energy", "ref_energy"):
        s.pop(k)
    out = decode_sample(encode_sample(s), "x")
    assert "energy" not in out and "forces" not in out


@pytest.mark.parametrize("field,value,msg", [
    ("positions", None, "missing field 'positions'"),
    ("forces", np.zeros((3, 3)), "field 'forces' has shape"),
    ("positions", "nan", "field 'positions' contains NaN"),
    ("numbers", "zero", "atomic numbers outside"),
])
def test_invalid_samples_named(field, value, msg):
    s = oc20_frames(1, seed=0)[0]
    if value is None:
        s.pop(field)
    elif isinstance(value, str) and value == "nan":
        s[field] = s[field].copy()
        s[field][3, 1] = np.nan
    elif isinstance(value, str):
        s[field] = np.zeros_like(s[field])
    else:
        s[field] = value
    with pytest.raises(SampleError, match=f"sample {s['sid']}_{s['fid']}: {msg}"):
        encode_sample(s)


def test_truncated_member_named():
    data = encode_sample(oc20_frames(1, seed=0)[0])
    with pytest.raises(SampleError, match="shard s.tar sample k: cannot decode"):
        decode_sample(data[:-40], "shard s.tar sample k")
