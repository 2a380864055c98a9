"""Import sources: the allow-list, and decoding within bounds (no S3 needed)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from lhv_index.errors import InvalidRequest
from worker.service.config import ImportPolicy
from worker.service.importsource import SourcePolicy, decode_npy, decode_npz
from worker.storage.blobstore import S3Config

S3 = S3Config(bucket="lhv", prefix="prod")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
    return buf.getvalue()


def test_default_allow_list_is_the_imports_prefix_of_the_workers_store() -> None:
    policy = SourcePolicy(ImportPolicy(), S3)
    assert policy.allowed == ("s3://lhv/prod/imports/",)
    assert policy.check("s3://lhv/prod/imports/a/v.npy", "source") == (
        "lhv",
        "prod/imports/a/v.npy",
    )
    for uri in ("s3://lhv/prod/importsx/v.npy", "s3://lhv/other/imports/v.npy", "s3://xyz/v.npy"):
        with pytest.raises(InvalidRequest, match="LHV_IMPORT_SOURCES"):
            policy.check(uri, "source")


def test_workers_own_objects_are_refused_whatever_the_allow_list_says() -> None:
    policy = SourcePolicy(ImportPolicy(sources=("s3://lhv",)), S3)
    assert policy.check("s3://lhv/elsewhere/v.npy", "source")[1] == "elsewhere/v.npy"
    for key in ("partitions/t/00000/manifest.json", "merges/t/exports/x.lhv", "keys/k"):
        with pytest.raises(InvalidRequest, match="workers' own"):
            policy.check(f"s3://lhv/prod/{key}", "source")


@pytest.mark.parametrize(
    "uri",
    [
        "s3://lhv/prod/imports/../partitions/m.json",
        "s3://lhv/prod/imports//v.npy",
        "s3://lhv/prod/imports/./v.npy",
        "s3://lhv/prod/imports/%2e%2e/v.npy",
        "s3://lhv/prod/imports/v.npy?versionId=1",
        "s3://lhv/prod/imports/a\\..\\v.npy",
        "s3://lhv@evil:9000/prod/imports/v.npy",
        "https://lhv/prod/imports/v.npy",
        "S3://lhv/prod/imports/v.npy",
        "s3://lhv/prod/imports/",
    ],
)
def test_path_tricks_are_refused(uri: str) -> None:
    with pytest.raises(InvalidRequest, match="plain s3://bucket/key"):
        SourcePolicy(ImportPolicy(sources=("s3://lhv/",)), S3).check(uri, "source")


def test_npy_header_is_checked_before_any_array_exists() -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 10**9)}
    )
    with pytest.raises(InvalidRequest, match=r"larger than 1000 bytes \(LHV_X\)"):
        decode_npy(buf.getvalue(), "source", kinds="f", max_bytes=1000, setting="LHV_X")
    data = _npy(np.arange(12, dtype=np.float32).reshape(3, 4))
    arr = decode_npy(data, "source", kinds="f", max_bytes=1000, setting="LHV_X")
    assert arr.shape == (3, 4) and arr[2, 3] == 11
    with pytest.raises(InvalidRequest, match="not a readable"):
        decode_npy(data[:-4], "source", kinds="f", max_bytes=1000, setting="LHV_X")
    with pytest.raises(InvalidRequest, match="unsupported type"):
        decode_npy(_npy(np.array(["a"])), "source", kinds="f", max_bytes=1000, setting="LHV_X")


def test_npz_is_checked_from_its_directory_before_inflating() -> None:
    vectors = np.zeros((1000, 64), np.float32)  # 256 000 bytes of zeros: compresses ~1000:1
    bomb = _npz(vectors=vectors)
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_COMPRESSION_RATIO"):
        decode_npz(bomb, "source", ImportPolicy(), ("vectors",))
    relaxed = ImportPolicy(max_compression_ratio=100_000)
    assert decode_npz(bomb, "source", relaxed, ("vectors",))["vectors"].shape == (1000, 64)
    small = ImportPolicy(max_compression_ratio=100_000, max_inflated_bytes=100_000)
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_INFLATED_BYTES"):
        decode_npz(bomb, "source", small, ("vectors",))
    many = _npz(**{f"a{i}": np.ones(1) for i in range(5)})
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_MEMBERS"):
        decode_npz(many, "source", ImportPolicy(max_members=4), ("vectors",))
    with pytest.raises(InvalidRequest, match=r"not a readable \.npz"):
        decode_npz(b"PK\x03\x04 not a zip", "source", ImportPolicy(), ("vectors",))


def test_npz_member_longer_than_declared_is_cut_at_its_declared_size() -> None:
    data = bytearray(_npz(vectors=np.ones((4, 4), np.float32)))
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        assert zf.infolist()[0].file_size > 0
    # A lying directory cannot make the reader inflate more than it declares: zipfile
    # stops at the declared size and the CRC check fails, which is "not readable".
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()[0]
    start = data.rfind(b"PK\x01\x02")
    size_at = start + 24  # uncompressed size in the central directory entry
    data[size_at : size_at + 4] = (info.file_size - 16).to_bytes(4, "little")
    with pytest.raises(InvalidRequest):
        decode_npz(bytes(data), "source", ImportPolicy(), ("vectors",))
