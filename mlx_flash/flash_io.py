"""Reads of FFN records from the bundle, straight into caller-owned rows.

Records whose wanted byte ranges lie close together on disk are read with one positional
vectored read (`os.preadv`), landing directly in the destination rows: no intermediate buffer,
no copy. Groups of reads are spread over a thread pool (flash wants many requests in flight).
In cold mode the OS page cache is bypassed — `F_NOCACHE` on macOS; on Linux read-ahead is off
and the pages just read are dropped (`posix_fadvise`) — so every read reaches the storage and
the engine's own cache is the only copy in memory. Counters tell how many bytes, records and
read calls were issued and how long they took.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from .bundle import Bundle, RecordFamily, crc32, table_digest
from .errors import BundleError
from .neuron_matrix import NeuronMatrix

# Reading up to this many unwanted bytes between two wanted ranges costs less than a second
# read call (page cache: ~4 us per call vs ~4 GB/s; tools/flash_profile.py measures flash).
DEFAULT_MAX_GAP = 16 * 1024
# Merged reads are cut at this size so that the threads share them: tools/flash_profile.py
# peaks at 256 KiB reads with 8 threads here (1588 MB/s; one thread reading 512 KiB: 976).
DEFAULT_MAX_READ = 256 * 1024
IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
PAGE = 4096
# Records of several pieces (parts, padding) that average fewer bytes than this are copied
# whole into a scratch matrix of GATHER_BYTES before their CRC32s: one call per record, not one
# per piece (the default model's Q4_1 neurons, 7 parts in 1872 bytes: 0.5 us a record, not 1.2)
GATHER_PIECE = 2048
GATHER_BYTES = 256 * 1024


def wait_all(futures: Sequence[Future]) -> None:
    """Wait until every future has ended, even through Ctrl-C (raised once they have): the
    rows a read was writing into must not be handed on while it still writes."""
    interrupted = None
    while True:
        try:
            wait(futures)
            break
        except KeyboardInterrupt as e:
            interrupted = e
            for f in futures:
                f.cancel()  # those not started never will
    if interrupted is not None:
        raise interrupted


@dataclass
class ReadCounters:
    bytes: int = 0
    records: int = 0
    calls: int = 0
    seconds: float = 0.0


class ReadPool:
    """Spreads a reader's reads over `threads` threads (started on first use; reads may come
    from two threads at once: the engine reads ahead), and counts what they read."""

    def __init__(self, threads: int, name: str):
        self.threads, self.name = threads, name
        self.counters = ReadCounters()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def run(self, read_all: Callable[[list], tuple[int, int]], reads: list, records: int,
            t0: float) -> None:
        """`read_all` over `reads`, split among the threads; counts the bytes and calls it
        returns, `records`, and the time since `t0`. Every read ends before any error is
        raised: the caller may hand the rows of a failed read to other records, which a read
        still running would overwrite."""
        if self.threads > 1 and len(reads) > 1:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            futures = [self._pool.submit(read_all, reads[i::self.threads])
                       for i in range(min(self.threads, len(reads)))]
            wait_all(futures)
            done = [f.result() for f in futures]
        else:
            done = [read_all(reads)]
        with self._lock:
            self.counters.bytes += sum(b for b, _ in done)
            self.counters.calls += sum(c for _, c in done)
            self.counters.records += records
            self.counters.seconds += time.perf_counter() - t0

    def close(self, wait: bool = True) -> None:
        """Stop the threads; `wait` for them to end (never from a finalizer: garbage
        collection may run inside a thread that is starting, and joining there deadlocks the
        thread waiting for it to start, seen once in the test suite)."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait)
            self._pool = None


def coalesce(ids: np.ndarray, record_bytes: int = 1, span_bytes: int = 1,
             max_gap: int = 0, max_read: int = 0) -> list[tuple[int, int]]:
    """Group sorted record ids into reads: [(first index, count)]. Consecutive ids join a read
    when the bytes between their spans (`span_bytes` of each `record_bytes` record are wanted)
    are at most `max_gap`: one larger read beats two small ones below that gap. With
    `max_read`, a read is cut at every `max_read` bytes from its first record (before the
    first record starting past the mark): several mid-sized reads in flight beat one long
    one."""
    if len(ids) == 0:
        return []
    new = np.ones(len(ids), dtype=bool)  # record k starts a read
    new[1:] = (np.diff(ids) - 1) * record_bytes + (record_bytes - span_bytes) > max_gap
    if max_read:
        starts = np.flatnonzero(new)
        first = ids[starts][np.cumsum(new) - 1]  # first record of each record's read
        piece = (ids - first) * record_bytes // max_read
        new[1:] |= piece[1:] != piece[:-1]
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(ids))
    return [(int(s), int(e - s)) for s, e in zip(starts, ends, strict=True)]


class FlashReader:
    """Positional reads of fixed-size records from one file."""

    def __init__(self, path: str | os.PathLike, max_gap: int = DEFAULT_MAX_GAP,
                 threads: int = 1, cold: bool = False, use_mmap: bool = False,
                 max_read: int = DEFAULT_MAX_READ):
        self.path = os.fspath(path)
        self.max_gap = max_gap
        self.max_read = max_read
        self.threads = threads
        self.cold = cold
        self.fd = os.open(self.path, os.O_RDONLY)
        # the benchmark's "mmap" engine: copies out of a memory map, the OS paging it in
        self._map = None
        if use_mmap:
            import mmap

            self._map = memoryview(mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ))
        if cold:
            if sys.platform == "darwin":
                import fcntl

                fcntl.fcntl(self.fd, fcntl.F_NOCACHE, 1)
            elif hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
                self.drop_cache()
        self.pool = ReadPool(threads, "flash-read")
        self.counters = self.pool.counters
        self._scratch = memoryview(bytearray(max_gap))

    def set_max_gap(self, gap: int) -> None:
        """Merge reads across gaps of up to `gap` bytes from now on (the disk's own figure:
        mlx_flash.disk_probe; the scratch buffer grows on the next read)."""
        self.max_gap = gap

    def close(self, wait: bool = True) -> None:
        self.pool.close(wait)
        if self._map is not None:
            self._map.release()
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close(wait=False)  # a finalizer never joins threads (ReadPool.close)

    def drop_cache(self, offset: int = 0, length: int = 0) -> None:
        """Ask the OS to forget its cached pages of [offset, offset + length) (0: to the end),
        widened to whole pages (narrower ranges drop nothing)."""
        if hasattr(os, "posix_fadvise"):
            start = offset - offset % PAGE
            end = 0 if length == 0 else -(-(offset + length) // PAGE) * PAGE
            os.posix_fadvise(self.fd, start, end - start if end else 0,
                             os.POSIX_FADV_DONTNEED)

    def read_vectored(self, offset: int, iovecs: list[memoryview]) -> tuple[int, int]:
        """Fill `iovecs` in order with the file's bytes from `offset` (several preadv calls
        when there are more buffers than one call takes, or the kernel returns short).
        Returns (bytes, calls)."""
        if self._map is not None:
            for b in iovecs:
                if offset + len(b) > len(self._map):
                    raise BundleError(f"{self.path} ends at byte {len(self._map)}: the bundle "
                                      "is truncated")
                b[:] = self._map[offset:offset + len(b)]
                offset += len(b)
            return sum(len(b) for b in iovecs), 0
        start, calls, pending = offset, 0, iovecs
        while pending:
            batch = pending[:IOV_MAX]
            want = sum(len(b) for b in batch)
            n = os.preadv(self.fd, batch, offset)
            calls += 1
            if n == 0:
                raise BundleError(f"{self.path} ends at byte {offset}: the bundle is truncated")
            if not 0 < n <= want:  # no kernel does this; a broken file system or shim might
                raise BundleError(f"reading {self.path} at byte {offset} returned {n} bytes "
                                  f"for {want} asked")
            offset += n
            if n == want:
                pending = pending[IOV_MAX:]
                continue
            # short read: skip the filled buffers, trim the partly filled one
            for i, b in enumerate(batch):
                if n < len(b):
                    pending = [b[n:]] + pending[i + 1:]
                    break
                n -= len(b)
        if self.cold and sys.platform != "darwin":
            self.drop_cache(start, offset - start)
        return offset - start, calls

    def read_records(self, family: RecordFamily, layer: int, ids: np.ndarray,
                     slots: np.ndarray, matrix: NeuronMatrix,
                     parts: Sequence[str] | None = None, into_free_rows: bool = False) -> None:
        """Read records `ids` (sorted) of `family`'s segment for `layer` into rows `slots` of
        `matrix`: the parts named (default: all), or rather the record range covering them.

        Records whose wanted ranges lie at most `max_gap` bytes apart are one read (up to about
        `max_read` bytes): the bytes in between land in a scratch buffer (and count as read).
        `into_free_rows`: the rows between two records' slots are free, so where the records
        between two read ones land exactly there (`slots` step as `ids` do) they are read into
        them, and whole records make one buffer per read. With `threads` > 1 the reads are
        spread over a thread pool.
        """
        t0 = time.perf_counter()
        parts = [p.name for p in family.parts] if parts is None else list(parts)
        start, end = matrix.span(parts)
        base = family.segments[layer][0] + start
        rb, span = family.record_bytes, end - start
        if len(self._scratch) < self.max_gap:  # gaps merged over land here
            self._scratch = memoryview(bytearray(self.max_gap))
        # A piece: records whose spans follow each other on disk and land in rows that follow
        # each other (one buffer when the span is a single part). Spans of whole records touch.
        step, row_step = np.diff(ids), np.diff(slots)
        piece = np.ones(len(ids), dtype=bool)
        if span == rb:
            piece[1:] = row_step != step if into_free_rows else (step != 1) | (row_step != 1)
        reads = []
        cut = self.max_read if self.threads > 1 else 0  # one thread reads best in one go
        for first, count in coalesce(ids, rb, span, self.max_gap, cut):
            local = piece[first:first + count].copy()
            local[0] = True  # a read cut at max_read may start inside a piece
            starts = first + np.flatnonzero(local)
            ends = np.append(starts[1:], first + count)
            iovecs: list[memoryview] = []
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                if a > first:
                    gap = int(ids[a] - ids[a - 1]) * rb - span
                    if gap:
                        iovecs.append(self._scratch[:gap])
                records = int(ids[b - 1] - ids[a]) + 1  # b - a unless read into free rows
                iovecs.extend(matrix.iovecs(int(slots[a]), records, parts))
            reads.append((base + int(ids[first]) * rb, iovecs))
        self.pool.run(self._read_all, reads, len(ids), t0)

    def _read_all(self, reads: list[tuple[int, list[memoryview]]]) -> tuple[int, int]:
        total = calls = 0
        for offset, iovecs in reads:
            n, c = self.read_vectored(offset, iovecs)
            total += n
            calls += c
        return total, calls


class RecordChecker:
    """Checks FFN records read from a bundle against the CRC32s stored after their segments
    (families with `checksums`; those of bundles converted before checksums are not checked).

    Every read is checked, not only a record's first: a disk, network file system or driver
    that returns other bytes than the file's (random bytes, a stale buffer, another block) on
    a read that reports success is caught on that read, and its rows are not used
    (docs/FORMAT.md measures the cost: CRC32 with the CPU's instructions, `bundle.crc32`).
    A segment's table of checksums is read once and, where the manifest seals it (`tables`),
    checked against the manifest: a record and its checksum altered together, a relabelled
    layout or swapped segments are caught. Thread-safe: the engine reads ahead in a
    background thread.
    """

    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self._tables: dict[tuple[str, int], np.ndarray] = {}
        self._layouts: dict[str, tuple[list[tuple[int, str]], int, bytes]] = {}
        self._lock = threading.Lock()
        self.records = 0  # records checked
        self.seconds = 0.0  # in checking them

    def table(self, family: RecordFamily, layer: int) -> np.ndarray:
        """The stored CRC32 of each record of a segment (read once, checked against the
        manifest's seal where it has one)."""
        key = (family.name, layer)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                offset, length = family.segments[layer]
                with open(self.bundle.path / family.file, "rb") as f:
                    raw = os.pread(f.fileno(), 4 * family.count, offset + length)
                if len(raw) != 4 * family.count:
                    raise BundleError(f"{family.file} is truncated: no checksums for "
                                      f"{family.name}[{layer}]")
                if family.tables is not None \
                        and table_digest(family, layer, raw) != family.tables[layer]:
                    raise BundleError(
                        f"{family.file}: the checksums of {family.name}[{layer}] are not those "
                        "the manifest was sealed with: the file or the manifest was altered "
                        "(convert the model again)")
                table = self._tables[key] = np.frombuffer(raw, dtype="<u4")
            return table

    def _layout(self, fam: RecordFamily) -> tuple[list[tuple[int, str]], int, bytes]:
        """A record in file order: [(zero bytes before a part, the part)], zero bytes after
        the last, and zeros enough for each (padding is taken as the zeros every writer puts
        there: a reader does not keep it)."""
        layout = self._layouts.get(fam.name)
        if layout is None:
            pieces, position = [], 0
            for p in sorted(fam.parts, key=lambda p: p.offset):
                pieces.append((p.offset - position, p.name))
                position = p.offset + p.nbytes
            tail = fam.record_bytes - position
            layout = pieces, tail, bytes(max([tail] + [gap for gap, _ in pieces]))
            self._layouts[fam.name] = layout
        return layout

    def _crcs(self, fam: RecordFamily, slots: np.ndarray, rows: Mapping[str, np.ndarray],
              out: np.ndarray) -> None:
        """The CRC32 of the records in rows `slots` of `rows`, into `out`."""
        pieces, tail, zeros = self._layout(fam)
        calls = len(pieces) + sum(1 for gap, _ in pieces if gap) + bool(tail)  # per record
        if calls == 1:  # the record is one part
            part = rows[pieces[0][1]]
            out[:] = [crc32(part[slot]) for slot in slots.tolist()]
            return
        if fam.record_bytes < GATHER_PIECE * calls:
            return self._gathered(fam, slots, rows, out)
        parts = [(zeros[:gap], rows[name]) for gap, name in pieces]
        padding = zeros[:tail]
        for k, slot in enumerate(slots.tolist()):
            crc = 0
            for before, part in parts:
                if before:
                    crc = crc32(before, crc)
                crc = crc32(part[slot], crc)
            out[k] = crc32(padding, crc) if padding else crc

    def _gathered(self, fam: RecordFamily, slots: np.ndarray, rows: Mapping[str, np.ndarray],
                  out: np.ndarray) -> None:
        """`_crcs` of records of many small parts: a few at a time copied whole (padding
        zeros included) into a scratch matrix, one CRC32 call each."""
        columns, position = [], 0
        for gap, name in self._layout(fam)[0]:
            position += gap
            columns.append((position, position + rows[name].shape[1], rows[name]))
            position = columns[-1][1]
        size = fam.record_bytes
        step = max(1, GATHER_BYTES // size)
        scratch = np.zeros((min(step, len(slots)), size), dtype=np.uint8)
        flat = memoryview(scratch).cast("B")
        for first in range(0, len(slots), step):
            some = slots[first:first + step]
            for start, end, part in columns:
                scratch[:len(some), start:end] = part[some]
            out[first:first + len(some)] = [crc32(flat[k * size:(k + 1) * size])
                                            for k in range(len(some))]

    def check(self, family: str, layer: int, ids: np.ndarray, slots: np.ndarray,
              rows: Mapping[str, np.ndarray]) -> None:
        """Check records `ids` of `family`'s segment for `layer`, whose parts were just read
        into rows `slots` of `rows` (part name -> `[rows, part bytes]` uint8; records are
        checked only when every part of the family is there). Raises BundleError naming the
        first record whose bytes differ from its checksum."""
        fam = self.bundle.families[family]
        if fam.checksums is None or len(ids) == 0 or any(p.name not in rows for p in fam.parts):
            return  # no checksums (an older bundle), or records read in part: not checkable
        t0 = time.perf_counter()
        stored = self.table(fam, layer)[ids]
        got = np.empty(len(ids), dtype=np.uint32)
        self._crcs(fam, slots, rows, got)
        bad = np.flatnonzero(got != stored)
        with self._lock:
            self.records += len(ids)
            self.seconds += time.perf_counter() - t0
        if len(bad):
            raise BundleError(
                f"{fam.file}: record {ids[bad[0]]} of {family}[{layer}] does not match its "
                "checksum: the file is damaged, or the storage returned other bytes than it "
                "holds (if it persists, check the disk and convert the model again)")
