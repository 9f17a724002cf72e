"""Safetensors files written as a stream (one tensor in memory at a time, hashed as written) and read back
memory-mapped, so a session of many GB is neither copied whole into RAM to save nor to load.

The files are ordinary safetensors (the `safetensors` library reads them); writing our own lets the bytes go
through `atomic.write_atomic` and its sha256, and reading our own gives a lazy copy-on-write mmap.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from salachat.sessions.atomic import write_atomic

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_NAME = {name: dtype for dtype, name in DTYPES.items()}
CHUNK = 16 << 20


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _stream(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Iterator[bytes | memoryview]:
    # Widest dtypes first: every tensor then starts at a multiple of its element size, so mmap views need no copy.
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    yield struct.pack("<Q", len(encoded)) + encoded
    for name in names:
        view = memoryview(_raw(tensors[name]).numpy())
        for begin in range(0, len(view), CHUNK):
            yield view[begin : begin + CHUNK]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Atomically write a safetensors file; returns (sha256, bytes)."""
    return write_atomic(path, _stream(tensors, metadata or {}))


def load_tensors_mmap(path: Path) -> dict[str, torch.Tensor]:
    """Tensors as copy-on-write views of a memory map: pages are read from disk only when touched."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    data = torch.from_numpy(mapped[8 + length :])
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype, shape = FROM_NAME[info["dtype"]], info["shape"]
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors
