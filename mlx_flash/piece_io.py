"""Experts read from a model's own files (mlx_flash.expert_index), straight into the slots.

`PieceReader` has `FlashReader.read_records`' signature, so the expert cache and engine use
it unchanged: an expert is one piece per part (gate, up, down; quantized: packed words,
scales and biases), each where the source stores it. The pieces of the experts asked for are
sorted by file and offset, pieces that touch (an mlx-lm folder's experts e and e+1 of one
tensor do) or lie at most `max_gap` apart are one vectored read (`os.preadv` into the slot
rows, the gap into a scratch buffer), reads are cut at `max_read` bytes and issued together
over a thread pool. A piece stored in another dtype than its slot's (bfloat16 scales on
MLX's CPU backend, whose quantized products compute in float32) is read into a staging
buffer and converted into its slot: at most `SourceModel.stage_bytes` of staging at a time.
A GGUF's expert piece (GGML blocks, `mlx_flash.gguf_index`) fills its tensor's parts as
`convert` would: Q4_0/Q4_1/Q8_0 as packed words, scales and biases, other types dequantized.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .bundle import PART_DTYPES, RecordFamily
from .errors import BundleError
from .expert_index import SourceModel
from .flash_io import DEFAULT_MAX_GAP, DEFAULT_MAX_READ, FlashReader, ReadPool
from .neuron_matrix import NeuronMatrix
from .sources.gguf import _gguf_blocks


def convert_into(row: np.ndarray, stage: memoryview, src: str, dst: str) -> None:
    """Write `stage` (elements of `src`) into the uint8 `row` as `dst` (exact widening from
    16-bit floats to float32; other pairs through MLX's own conversion)."""
    if (src, dst) == ("bfloat16", "float32"):
        row.view(np.uint32)[:] = np.frombuffer(stage, dtype=np.uint16).astype(np.uint32) << 16
    elif (src, dst) == ("float16", "float32"):
        row.view(np.float32)[:] = np.frombuffer(stage, dtype=np.float16)
    else:
        a = mx.array(np.frombuffer(stage, dtype=np.uint8)).view(PART_DTYPES[src])
        row[:] = np.array(a.astype(PART_DTYPES[dst]).view(mx.uint8))


def convert_blocks(rows: dict[str, np.ndarray], stage: memoryview, kind: str,
                   dtypes: dict[str, str], tensor: str) -> None:
    """Write GGML blocks `stage` of type `kind` (a GGUF expert's piece) into its slot `rows`
    as `convert` stores them: Q4_0/Q4_1/Q8_0 as MLX's affine quantization (packed words, then
    float16 scales and biases in their slot `dtypes`), other types dequantized (float32,
    then the slot's dtype)."""
    raw = np.frombuffer(stage, dtype=np.uint8)
    if kind in ("Q4_0", "Q4_1", "Q8_0"):
        words, scales, biases, _ = _gguf_blocks(raw, kind, (1,))
        rows[tensor].view(np.uint32)[:] = words.reshape(-1)
        for part, a in ((f"{tensor}.scales", scales), (f"{tensor}.biases", biases)):
            convert_into(rows[part], memoryview(a.reshape(-1).view(np.uint8)), "float16",
                         dtypes[part])
        return
    import gguf

    w = gguf.quants.dequantize(raw.reshape(1, -1), gguf.GGMLQuantizationType[kind])
    w = mx.array(np.asarray(w, dtype=np.float32).reshape(-1))
    rows[tensor][:] = np.array(w.astype(PART_DTYPES[dtypes[tensor]]).view(mx.uint8))


class PieceReader:
    """Reads of experts' pieces from the source files of `source`."""

    def __init__(self, source: SourceModel, threads: int = 1, cold: bool = False,
                 use_mmap: bool = False, max_gap: int = DEFAULT_MAX_GAP,
                 max_read: int = DEFAULT_MAX_READ):
        self.source = source
        self.threads, self.max_gap, self.max_read = threads, max_gap, max_read
        self.files = [FlashReader(f, max_gap, cold=cold, use_mmap=use_mmap)
                      for f in source.files]
        self.pool = ReadPool(threads, "piece-read")
        self.counters = self.pool.counters
        self._scratch = memoryview(bytearray(max_gap))

    def set_max_gap(self, gap: int) -> None:
        """Merge reads across gaps of up to `gap` bytes from now on (the disk's own figure:
        mlx_flash.disk_probe), in this reader and its files'."""
        self.max_gap = gap
        self._scratch = memoryview(bytearray(max(gap, len(self._scratch))))
        for f in self.files:
            f.set_max_gap(gap)

    def close(self, wait: bool = True) -> None:
        self.pool.close(wait)
        for f in self.files:
            f.close(wait)

    def __del__(self) -> None:
        self.close(wait=False)  # a finalizer never joins threads (ReadPool.close)

    def read_records(self, family: RecordFamily, layer: int, ids: np.ndarray,
                     slots: np.ndarray, matrix: NeuronMatrix,
                     parts: Sequence[str] | None = None, into_free_rows: bool = False) -> None:
        """Read experts `ids` of `layer` into rows `slots` of `matrix`: the tensors `parts`
        (default: all), each expert's pieces where the source keeps them."""
        t0 = time.perf_counter()
        names = family.expand(family.tensors if parts is None else parts)
        pieces = self.source.pieces[layer]
        converted = sum(pieces[n][2] for n in names
                        if n in pieces and pieces[n][3] != family.part(n).dtype)
        # experts per batch: the staging of their converted pieces within the plan's share
        room = self.source.stage_bytes - getattr(self.source, "transient_bytes", 0)
        batch = len(ids) if not converted else max(1, room // converted)
        for b in range(0, len(ids), max(1, batch)):
            self._read_batch(family, layer, ids[b:b + batch], slots[b:b + batch], matrix,
                             names, t0 if b == 0 else time.perf_counter())

    def _read_batch(self, family: RecordFamily, layer: int, ids: np.ndarray,
                    slots: np.ndarray, matrix: NeuronMatrix, names: list[str], t0: float
                    ) -> None:
        targets = []  # (file, offset, bytes, buffer)
        staged = []  # (row, stage, stored dtype, slot dtype)
        pieces = self.source.pieces[layer]
        for name in names:
            if name not in pieces:  # a part a GGML block piece of its tensor fills
                continue
            files, offsets, nbytes, dtype = pieces[name]
            want = family.part(name).dtype
            fills = [n for n in names if n == name or n.startswith(f"{name}.")
                     and n not in pieces]
            for e, s in zip(ids.tolist(), slots.tolist(), strict=True):
                if dtype == want:
                    buffer = memoryview(matrix.rows[name][s])
                else:
                    buffer = memoryview(bytearray(nbytes))
                    staged.append(({n: matrix.rows[n][s] for n in fills}, buffer, dtype, name))
                targets.append((int(files[e]), int(offsets[e]), nbytes, buffer))
        targets.sort(key=lambda t: (t[0], t[1]))
        reads: list[tuple[int, int, list[memoryview]]] = []  # (file, offset, buffers)
        end = -1
        for f, offset, nbytes, buffer in targets:
            if reads and reads[-1][0] == f and 0 <= offset - end <= self.max_gap \
                    and offset + nbytes - reads[-1][1] <= max(self.max_read, nbytes):
                if offset > end:
                    reads[-1][2].append(self._scratch[:offset - end])
                reads[-1][2].append(buffer)
            else:
                reads.append((f, offset, [buffer]))
            end = offset + nbytes
        self.pool.run(self._read_all, reads, len(ids), t0)  # the conversions below: compute
        for rows, stage, dtype, name in staged:
            if dtype in PART_DTYPES:
                convert_into(rows[name], stage, dtype, family.part(name).dtype)
            else:  # GGML blocks
                convert_blocks(rows, stage, dtype, {n: family.part(n).dtype for n in rows},
                               name)

    def _read_all(self, reads: list[tuple[int, int, list[memoryview]]]) -> tuple[int, int]:
        total = calls = 0
        for f, offset, buffers in reads:
            reader = self.files[f]
            try:
                n, c = reader.read_vectored(offset, buffers)
            except BundleError as e:
                if "is truncated" not in str(e):
                    raise
                raise BundleError(f"{reader.path} is shorter than its expert index says: it "
                                  "changed since it was indexed (load the model again)"
                                  ) from None
            total += n
            calls += c
        return total, calls
