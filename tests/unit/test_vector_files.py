"""`.npy`/`.npz` vector files: `lhv load` and `import` read them with one reader, so they
accept the same files and refuse the same ones before allocating anything."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lhv_index.errors import InvalidRequest
from worker.client.files import LoadError, open_vectors
from worker.service.config import ImportPolicy
from worker.service.merge import _decode_arrays

VECS = np.arange(12, dtype=np.float32).reshape(3, 4)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _loaded(path: Path) -> tuple[np.ndarray, list[str]]:
    (batch,) = open_vectors(path).batches(100)
    return batch.vectors, batch.ids


def _imported(path: Path) -> tuple[np.ndarray, list[str]]:
    vectors, ids = _decode_arrays(path.read_bytes(), path.suffix[1:], ImportPolicy())
    return vectors, ids if ids is not None else [str(i) for i in range(len(vectors))]


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("plain.npy", _npy(VECS)),
        ("ints.npy", _npy(VECS.astype(np.int64))),
        ("fortran.npy", _npy(np.asfortranarray(VECS))),
        ("named.npz", _npz(vectors=VECS, ids=np.array(["a", "b", "c"]))),
        ("embeddings.npz", _npz(embeddings=VECS, ids=np.array([b"a", b"b", b"c"]))),
        ("unnamed.npz", _npz(arr=VECS, ids=np.array([7, 8, 9]))),
    ],
)
def test_load_and_import_read_the_same_vectors_and_ids(
    tmp_path: Path, name: str, data: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    loaded, imported = _loaded(path), _imported(path)
    np.testing.assert_array_equal(loaded[0], imported[0])
    np.testing.assert_array_equal(loaded[0], VECS)
    assert loaded[1] == imported[1]


def test_a_npy_header_declaring_more_than_the_file_holds_is_refused_by_both(
    tmp_path: Path,
) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**7, 10**6)}
    )
    path = tmp_path / "huge.npy"
    path.write_bytes(buf.getvalue() + bytes(64))
    with pytest.raises(LoadError, match=r"not a readable \.npy array"):
        open_vectors(path)
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_BYTES"):
        _imported(path)


def test_a_npz_bomb_is_refused_from_its_directory_by_both(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("vectors.npy", _npy(np.zeros((2000, 64), np.float32)))
    path = tmp_path / "bomb.npz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(LoadError, match="compressed more than 100 to 1"):
        open_vectors(path)
    with pytest.raises(InvalidRequest, match="LHV_MAX_IMPORT_COMPRESSION_RATIO"):
        _imported(path)


def test_a_pickled_or_object_array_is_refused_by_both(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    buf = io.BytesIO()
    np.savez(buf, vectors=np.array([[1, "a"]], dtype=object))  # type: ignore[arg-type]
    path.write_bytes(buf.getvalue())
    with pytest.raises(LoadError, match="unsupported type"):
        open_vectors(path)
    with pytest.raises(InvalidRequest, match="unsupported type"):
        _imported(path)
