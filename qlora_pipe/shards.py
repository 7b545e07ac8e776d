"""Streaming safetensors checkpoints: read one tensor at a time, write shards as tensors arrive.

Why our own: `safe_open` memory-maps whole files, and every page it touches counts toward the process's RSS until the
file is closed (a 5 GB shard read through = 5 GB of RSS); `save_file` needs every tensor of a shard in memory at once.
The format is simple (8-byte header length, JSON header, raw bytes), so we read with plain file reads and write each
shard's header up front, then the tensors' bytes in order: memory stays at about one tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX = "model.safetensors.index.json"


@dataclass
class TensorRef:
    """Where one tensor lies in a safetensors file."""

    file: Path
    key: str
    dtype: torch.dtype
    shape: list[int]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_index(files: list[Path]) -> list[TensorRef]:
    """Every tensor of a (possibly sharded) checkpoint, in file order."""
    refs = []
    for path in files:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        base = 8 + header_len
        for key, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, end = entry["data_offsets"]
            refs.append(TensorRef(path, key, DTYPES[entry["dtype"]], entry["shape"], base + start, base + end))
    return refs


def read_tensor(ref: TensorRef) -> torch.Tensor:
    buffer = bytearray(ref.nbytes)
    with ref.file.open("rb") as f:
        f.seek(ref.start)
        f.readinto(buffer)
    if not buffer:
        return torch.empty(ref.shape, dtype=ref.dtype)
    return torch.frombuffer(buffer, dtype=ref.dtype).reshape(ref.shape)


def parse_size(text: str) -> int:
    """'5GB' → 5e9 bytes, '500MiB' → 500 × 2^20 (transformers' convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(match[1]), match[2].upper()
    power = " KMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(number * (1024**power if "I" in unit else 1000**power))


@dataclass
class OutTensor:
    key: str
    dtype: torch.dtype
    shape: list[int]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty(0, dtype=self.dtype).element_size()


class ShardWriter:
    """Writes planned tensors, in order, into shards of at most `max_bytes` (a bigger single tensor gets its own)."""

    def __init__(self, out_dir: Path, tensors: list[OutTensor], max_bytes: int, basename: str = "model"):
        self.shards: list[list[OutTensor]] = [[]]
        size = 0
        for t in tensors:
            if self.shards[-1] and size + t.nbytes > max_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(t)
            size += t.nbytes
        n = len(self.shards)
        self.names = (
            [f"{basename}.safetensors"]
            if n == 1
            else [f"{basename}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        )
        self.out_dir = out_dir
        self.order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self.position = 0
        self.file = None
        self.total_bytes = sum(t.nbytes for t in tensors)
        # Writing overlaps the computation of the next tensor; at most one tensor waits in memory.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.pending: Future | None = None

    def _open(self, shard: int) -> None:
        if self.file:
            self.file.close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in self.shards[shard]:
            header[t.key] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": t.shape,
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = (self.out_dir / self.names[shard]).open("wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        shard, expected = self.order[self.position]
        if key != expected.key or tensor.dtype != expected.dtype or list(tensor.shape) != expected.shape:
            raise RuntimeError(f"shard writer expected {expected}, got {key} {tensor.dtype} {list(tensor.shape)}")
        new_shard = self.position == 0 or self.order[self.position - 1][0] != shard
        if self.pending:
            self.pending.result()
        self.pending = self.pool.submit(self._write, shard if new_shard else None, tensor)
        self.position += 1

    def _write(self, new_shard: int | None, tensor: torch.Tensor) -> None:
        if new_shard is not None:
            self._open(new_shard)
        self.file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no copy

    def close(self) -> None:
        if self.pending:
            self.pending.result()
        self.pool.shutdown()
        if self.position != len(self.order):
            raise RuntimeError(f"shard writer closed after {self.position} of {len(self.order)} tensors")
        self.file.close()
        if len(self.names) > 1:
            weight_map = {t.key: self.names[i] for i, t in self.order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, through its index when sharded."""
    index = model_dir / INDEX
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [model_dir / name for name in names]
    return sorted(model_dir.glob("*.safetensors"))
