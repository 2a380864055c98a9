"""The LHV1 frame: the container of full snapshots (`_snapshot`) and delta segments (`_delta`).

Frame::

    MAGIC (4 bytes, b"LHV1") | envelope length (u32, big-endian) | envelope (JSON) | sections

The envelope is a JSON object. From format 3 on it lists the sections that follow, in
frame order: ``"sections": [{"name", "length", "crc32"}, ...]`` (with ``"checksum":
"crc32"``); formats 1 and 2 are followed by exactly one section, `engine`, whose length
and crc32 sit in the envelope itself as `length` and `crc32` (`section_specs`). A sound
frame ends with its last section.

This module owns the frame and nothing inside it: writing one (`write_frame`), reading
one held in memory (`read_frame` -> `Frame`: the envelope, each section's bounds, every
checksum checked; `Frame.problems` lists them all, for tools that report rather than
refuse), and the section readers the snapshot and delta decoders use over bytes or a
stream (`frame_reader`). What the sections hold is specified where they are written.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

import numpy as np
import orjson

from lhv_index._capture import EnginePiece, FilePiece
from lhv_index._crc import crc32, crc32_combine
from lhv_index.errors import InvalidRequest, SnapshotError

__all__ = [
    "ENVELOPE_VERSION",
    "HEADER",
    "KIND_BASE",
    "KIND_DELTA",
    "MAGIC",
    "MAX_ENVELOPE_BYTES",
    "Frame",
    "FrameSection",
    "Section",
    "SectionReader",
    "Written",
    "frame_reader",
    "parse_envelope",
    "read_envelope",
    "read_frame",
    "section_specs",
    "write_frame",
]

MAGIC = b"LHV1"
HEADER = struct.Struct(">4sI")
ENVELOPE_VERSION = 3
#: envelope `kind` of a full snapshot (the default when absent) and of a delta segment
KIND_BASE = "base"
KIND_DELTA = "delta"
#: envelopes above this size are refused before being read (v2 ones hold every id)
MAX_ENVELOPE_BYTES = 1 << 31
#: bytes copied at a time between streams
_COPY_CHUNK = 1 << 20
#: reads checksummed at once when a section is copied from a file
_CRC_CHUNK = 8 << 20
#: bytes handed to `out.write` at a time from the engine's mapped files
_WRITE_CHUNK = 1 << 30


# -- writing ----------------------------------------------------------------------------


Section = tuple[str, list[EnginePiece]]
"""(section name, pieces): the section's bytes are the pieces concatenated"""


def _as_bytes(piece: bytes | memoryview | np.ndarray[Any, Any]) -> memoryview:
    """A flat byte view of an in-memory piece (an array must be C-contiguous)."""
    if isinstance(piece, np.ndarray):
        piece = piece.reshape(-1).view(np.uint8)
    view = memoryview(piece)  # type: ignore[arg-type]
    return view if view.format == "B" else view.cast("B")


def _views(piece: EnginePiece) -> Iterator[memoryview]:
    """The bytes of a piece as flat views: the piece itself when in memory, else its file
    in chunks (`FilePiece.chunks`), never whole in memory."""
    if isinstance(piece, FilePiece):
        for chunk in piece.chunks():
            yield memoryview(chunk)
        return
    with _as_bytes(piece) as view:
        yield view


def _section_entry(name: str, pieces: list[EnginePiece]) -> dict[str, Any]:
    """The envelope entry of a section: its length and crc32 over all its pieces (large
    buffers checksummed in two threads, see `_crc`)."""
    length, crc = 0, 0
    for piece in pieces:
        for view in _views(piece):
            crc = crc32_combine(crc, crc32(view), len(view)) if length else crc32(view)
            length += len(view)
    return {"name": name, "length": length, "crc32": crc}


def write_frame(
    out: BinaryIO | IO[bytes], envelope: dict[str, Any], sections: list[Section]
) -> int:
    """Write one LHV1 frame: header, `envelope` plus `"checksum"` and `"sections"` (the
    length and crc32 of each section, computed here), then the sections; returns the
    bytes written.

    A piece held in a file (`FilePiece`) is read twice, in chunks: once for its checksum,
    once to write it.

    Raises:
        InvalidRequest: the envelope is not valid JSON (e.g. a caller's `source`).
        ValueError: a file piece was closed (its base was closed before being written).
        OSError: a file piece is shorter than it says, or `out` failed.
    """
    entries = [_section_entry(name, pieces) for name, pieces in sections]
    try:
        env = orjson.dumps({**envelope, "checksum": "crc32", "sections": entries})
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidRequest(f"source is not valid JSON: {exc}") from None
    out.write(HEADER.pack(MAGIC, len(env)) + env)
    written = HEADER.size + len(env)
    for _, pieces in sections:
        for piece in pieces:
            for view in _views(piece):
                _write_all(out, view)
                written += len(view)
    return written


def _write_all(out: BinaryIO | IO[bytes], view: memoryview) -> None:
    """Write `view` to `out` in large pieces (a raw stream may take less than asked)."""
    pos, n = 0, len(view)
    while pos < n:
        end = min(n, pos + _WRITE_CHUNK)
        with view[pos:end] as piece:
            wrote = out.write(piece)
        if wrote == 0:
            raise OSError("snapshot output accepted no bytes")
        pos = end if wrote is None else pos + wrote


# -- the envelope and the section table ----------------------------------------------


def parse_envelope(raw: bytes | memoryview) -> dict[str, Any]:
    """The envelope of a frame: a JSON object.

    Raises:
        SnapshotError: not JSON, or not an object.
    """
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise SnapshotError(f"envelope is not JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise SnapshotError("envelope is not a JSON object")
    return envelope


def _envelope_length(header: bytes | memoryview) -> int:
    """The envelope length a header gives, after checking the magic and the bound."""
    magic, env_len = HEADER.unpack(header)
    if magic != MAGIC:
        raise SnapshotError(f"not an LHV1 snapshot (magic {magic!r})")
    if env_len > MAX_ENVELOPE_BYTES:
        raise SnapshotError(f"envelope of {env_len} bytes is over the limit")
    return int(env_len)


def _section_spec(spec: Any) -> tuple[str, int, int]:
    if not isinstance(spec, dict):
        raise SnapshotError("malformed section entry in envelope")
    name, length, crc = spec.get("name"), spec.get("length"), spec.get("crc32")
    if not isinstance(name, str) or type(length) is not int or type(crc) is not int:
        raise SnapshotError(f"malformed section entry in envelope: {spec!r}")
    if length < 0:
        raise SnapshotError(f"negative length for section {name!r}")
    return name, length, crc


def section_specs(envelope: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(name, length, crc32) of each section the envelope announces, in frame order:
    format 3 lists them in `sections`; formats 1 and 2 have one section, `engine`, whose
    length and crc32 are the envelope's own `length` and `crc32`.

    Raises:
        SnapshotError: a malformed section table.
    """
    if envelope.get("format") in (1, 2):
        spec = {"name": "engine", "length": envelope.get("length"), "crc32": envelope.get("crc32")}
        return [_section_spec(spec)]
    specs = envelope.get("sections")
    if not isinstance(specs, list):
        raise SnapshotError("envelope sections is not a list")
    return [_section_spec(spec) for spec in specs]


@dataclass(frozen=True, slots=True)
class FrameSection:
    """Where one section of a frame lies, and its checksum."""

    name: str
    start: int
    """byte offset of the section in the frame"""
    length: int
    crc32: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class Frame:
    """The envelope of one LHV1 frame and where its sections lie (`read_frame`)."""

    envelope: dict[str, Any]
    envelope_bytes: int
    """the envelope's length in bytes"""
    sections: tuple[FrameSection, ...]
    size: int
    """the frame's size in bytes (as read)"""

    @property
    def format(self) -> Any:
        """The envelope's `format` (1, 2 or 3 for frames this version reads)."""
        return self.envelope.get("format")

    @property
    def kind(self) -> str:
        """`"base"` (a full snapshot; also when the envelope names no kind) or `"delta"`."""
        return str(self.envelope.get("kind", KIND_BASE))

    @property
    def end(self) -> int:
        """Where the last section ends (equals `size` in a sound frame)."""
        return self.sections[-1].end if self.sections else HEADER.size + self.envelope_bytes

    def section(self, name: str) -> FrameSection | None:
        """The first section called `name`, if any."""
        return next((s for s in self.sections if s.name == name), None)

    def problems(self, data: bytes | bytearray | memoryview) -> list[str]:
        """Everything wrong with the sections of `data` (the bytes this frame was read
        from): a section cut short (then nothing after it is checked), a checksum that does
        not match, bytes after the last section. Empty for a sound frame."""
        out: list[str] = []
        with memoryview(data) as view, view.cast("B") as flat:
            for s in self.sections:
                if s.end > len(flat):
                    out.append(f"snapshot is truncated in section {s.name!r}")
                    break
                with flat[s.start : s.end] as part:
                    if crc32(part) != s.crc32:
                        out.append(f"checksum mismatch in section {s.name!r}")
            if self.end < len(flat):
                out.append(f"snapshot has {len(flat) - self.end} bytes after its last section")
        return out


def read_frame(data: bytes | bytearray | memoryview, *, verify: bool = True) -> Frame:
    """Read the header, envelope and section table of an LHV1 frame (any format this
    version reads, a full snapshot or a delta) held in memory.

    With `verify` (the default) every section must lie within `data`, its crc32 must
    match, and nothing may follow the last one; `verify=False` reads the envelope and
    section table only (to describe a damaged frame; see `Frame.problems`). Nothing inside
    the sections is decoded: `read_snapshot` and `read_delta` do that.

    Raises:
        SnapshotError: not an LHV1 frame, an unreadable envelope or section table, or
            (with `verify`) a truncated or corrupted section or trailing bytes.
    """
    with memoryview(data) as view, view.cast("B") as flat:
        if len(flat) < HEADER.size:
            raise SnapshotError("snapshot is truncated in the header")
        env_len = _envelope_length(flat[: HEADER.size])
        start = HEADER.size + env_len
        if start > len(flat):
            raise SnapshotError("snapshot is truncated in the envelope")
        envelope = parse_envelope(flat[HEADER.size : start])
        size = len(flat)
    sections = []
    for name, length, crc in section_specs(envelope):
        sections.append(FrameSection(name, start, length, crc))
        start += length
    frame = Frame(envelope, env_len, tuple(sections), size)
    if verify and (problems := frame.problems(data)):
        raise SnapshotError(problems[0])
    return frame


# -- reading sections in order (bytes or a stream) -------------------------------------


def _file_descriptor(src: BinaryIO | IO[bytes]) -> int | None:
    """The descriptor of `src` when it is a seekable regular file, else None."""
    try:
        fd = src.fileno()
        if not src.seekable() or not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd


def _copy_range(src: int, dst: int, start: int, length: int, errors: list[BaseException]) -> None:
    """Copy `length` bytes of `src` from `start` to the end of `dst` (a thread's target:
    the error, if any, goes to `errors`)."""
    kernel_copy = getattr(os, "copy_file_range", None)  # Linux only
    try:
        done = 0
        while done < length:
            n = 0
            if kernel_copy is not None:
                try:
                    n = kernel_copy(src, dst, length - done, start + done)
                except OSError:  # not between these files: through user space from now on
                    kernel_copy = None
            if kernel_copy is None:
                n = os.write(dst, os.pread(src, min(_COPY_CHUNK, length - done), start + done))
            if n == 0:
                raise SnapshotError("snapshot file ended inside a section")
            done += n
    except BaseException as exc:
        errors.append(exc)


def _crc_range(fd: int, start: int, length: int) -> int:
    """crc32 of `length` bytes of `fd` from `start` (reads of `_CRC_CHUNK`)."""
    running, done = 0, 0
    while done < length:
        chunk = os.pread(fd, min(_CRC_CHUNK, length - done), start + done)
        if not chunk:
            raise SnapshotError("snapshot file ended inside a section")
        running = zlib.crc32(chunk, running)
        done += len(chunk)
    return running


class _Reader:
    """Exact reads from a binary stream; a short read is a truncated snapshot."""

    def __init__(self, src: BinaryIO | IO[bytes]) -> None:
        self._src = src

    def read(self, n: int, what: str) -> bytes:
        data = self._src.read(n)
        if data is None or len(data) != n:
            # a raw stream may return less than asked before its end
            parts = [bytes(data or b"")]
            got = len(parts[0])
            while got < n and (more := self._src.read(n - got)):
                parts.append(bytes(more))
                got += len(more)
            if got != n:
                raise SnapshotError(f"snapshot is truncated in {what}")
            return b"".join(parts)
        return bytes(data)

    def section(self, spec: tuple[str, int, int]) -> bytes:
        name, length, crc = spec
        data = self.read(length, f"section {name!r}")
        if zlib.crc32(data) != crc:
            raise SnapshotError(f"checksum mismatch in section {name!r}")
        return data

    def section_to_file(self, spec: tuple[str, int, int], path: str) -> Written:
        """Copy a section to `path`, checking its length and checksum.

        From a file on disk (a downloaded snapshot), the kernel copies the bytes
        (`os.copy_file_range`) in a thread while this one checksums them from the page
        cache: no pass of the section through Python objects, and the two run on two
        cores. From any other stream, in chunks.
        """
        name, length, crc = spec
        fd = _file_descriptor(self._src)
        if fd is not None:
            start = self._src.tell()
            if os.fstat(fd).st_size - start < length:
                raise SnapshotError(f"snapshot is truncated in section {name!r}")
            errors: list[BaseException] = []
            with open(path, "wb") as out:
                copy = threading.Thread(
                    target=_copy_range, args=(fd, out.fileno(), start, length, errors)
                )
                copy.start()
                try:
                    running = _crc_range(fd, start, length)
                finally:
                    copy.join()
            if errors:
                raise errors[0]
            self._src.seek(start + length)
            if running != crc:
                raise SnapshotError(f"checksum mismatch in section {name!r}")
            return Written.done()
        got, running = 0, 0
        with open(path, "wb") as f:
            while got < length:
                chunk = self._src.read(min(_COPY_CHUNK, length - got))
                if not chunk:
                    raise SnapshotError(f"snapshot is truncated in section {name!r}")
                got += len(chunk)
                running = zlib.crc32(chunk, running)
                f.write(chunk)
        if running != crc:
            raise SnapshotError(f"checksum mismatch in section {name!r}")
        return Written.done()

    def finish(self) -> None:
        pass

    def expect_end(self) -> None:
        if self._src.read(1):
            raise SnapshotError("snapshot has bytes after its last section")


class _ViewReader:
    """The same reads over a buffer that holds the whole frame: no copies for the engine's
    bytes, which are checksummed while they are written to their file."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0
        self._pending: list[Written] = []

    def _take(self, n: int, what: str) -> memoryview:
        if n > len(self._view) - self._pos:
            raise SnapshotError(f"snapshot is truncated in {what}")
        part = self._view[self._pos : self._pos + n]
        self._pos += n
        return part

    def read(self, n: int, what: str) -> bytes:
        with self._take(n, what) as part:
            return part.tobytes()

    def section(self, spec: tuple[str, int, int]) -> bytes:
        name, length, crc = spec
        with self._take(length, f"section {name!r}") as part:
            if crc32(part) != crc:
                raise SnapshotError(f"checksum mismatch in section {name!r}")
            return part.tobytes()

    def section_to_file(self, spec: tuple[str, int, int], path: str) -> Written:
        """Start writing a section to `path` and checksumming it, in background threads
        (both release the GIL); `wait()` on the result before using the file."""
        name, length, crc = spec
        written = Written.start(self._take(length, f"section {name!r}"), path, name, crc)
        self._pending.append(written)
        return written

    def expect_end(self) -> None:
        if self._pos != len(self._view):
            raise SnapshotError("snapshot has bytes after its last section")

    def finish(self) -> None:
        """Wait for the background writes, so the buffer can be released."""
        for written in self._pending:
            written.join()


class Written:
    """A section being written to a file and checksummed in background threads."""

    def __init__(self, part: memoryview | None = None, name: str = "", expect: int = 0) -> None:
        self._part = part
        self._name = name
        self._expect = expect
        self._crc = expect
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    @classmethod
    def done(cls) -> Written:
        """A section that was already written and checked."""
        return cls()

    @classmethod
    def start(cls, part: memoryview, path: str, name: str, expect: int) -> Written:
        """Write `part` to `path` and checksum it; `part` is released once both are done."""
        self = cls(part, name, expect)

        def write() -> None:
            try:
                with open(path, "wb") as f:
                    _write_all(f, part)
            except BaseException as exc:
                self._errors.append(exc)

        def check() -> None:
            try:
                self._crc = crc32(part)
            except BaseException as exc:
                self._errors.append(exc)

        self._threads = [
            threading.Thread(target=fn, name="lhv-snapshot-io", daemon=True)
            for fn in (write, check)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads = []
        if self._part is not None:
            self._part.release()
            self._part = None

    def wait(self) -> None:
        """Join; raise what the write raised, or SnapshotError on a checksum mismatch."""
        self.join()
        if self._errors:
            raise self._errors[0]
        if self._crc != self._expect:
            raise SnapshotError(f"checksum mismatch in section {self._name!r}")


@contextmanager
def frame_reader(
    src: BinaryIO | IO[bytes] | bytes | bytearray | memoryview,
) -> Iterator[SectionReader]:
    """A reader over `src`: a view of the bytes when they are in memory, else a stream
    reader that reads one section at a time."""
    if isinstance(src, bytes | bytearray | memoryview):
        with memoryview(src) as view, view.cast("B") as flat:
            yield from _viewing(flat)
        return
    if isinstance(src, io.BytesIO):
        with src.getbuffer() as view, view[src.tell() :] as rest:
            yield from _viewing(rest)
        src.seek(0, os.SEEK_END)
        return
    # a file is read section by section: never whole in memory next to the decoded index
    yield _Reader(src)


SectionReader = _Reader | _ViewReader
"""reads the sections of one frame in order (`frame_reader`)"""


def _viewing(view: memoryview) -> Iterator[_ViewReader]:
    reader = _ViewReader(view)
    try:
        yield reader
    finally:
        reader.finish()


def read_envelope(reader: SectionReader) -> dict[str, Any]:
    """The header and envelope of the frame `reader` reads, checked to be an LHV1 frame
    with a JSON object; the reader is left at the first section."""
    env_len = _envelope_length(reader.read(HEADER.size, "the header"))
    return parse_envelope(reader.read(env_len, "the envelope"))
