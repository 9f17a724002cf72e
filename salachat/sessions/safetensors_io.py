"""Safetensors files written as a stream (one tensor in memory at a time, hashed as written) and read back
memory-mapped, so a session of many GB is neither copied whole into RAM to save nor to load.

The files are ordinary safetensors (the `safetensors` library reads them); writing our own lets the bytes go
through `atomic.write_atomic` and its sha256, and reading our own gives a lazy copy-on-write mmap.
"""

from __future__ import annotations

import json
import math
import os
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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 pieces: list[bytes] | None = None):
    """Atomically write a safetensors file; returns (sha256, bytes); `pieces` receives the piece digests."""
    return write_atomic(path, _stream(tensors, metadata or {}), pieces)


MAX_HEADER = 100 << 20  # a session file's header names a few hundred tensors: kilobytes


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}) of a safetensors file, each entry
    checked against the file: a known dtype, a shape of whole numbers, offsets inside the data that hold
    exactly that shape. ValueError names what is wrong."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name} is too short for a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, MAX_HEADER):
            raise ValueError(f"{path.name}: header of {length:,} bytes in a file of {size:,}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):
            raise ValueError(f"{path.name}: unreadable header") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: unreadable header")  # noqa: TRY004 (callers catch ValueError: bad data)
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    for name, info in header.items():
        if (not isinstance(info, dict) or info.get("dtype") not in FROM_NAME or not isinstance(info.get("shape"), list)
                or not isinstance(info.get("data_offsets"), list) or len(info["data_offsets"]) != 2):
            raise ValueError(f"{path.name}: malformed entry for {name!r}")
        shape, (begin, end) = info["shape"], info["data_offsets"]
        if not all(type(d) is int and d >= 0 for d in shape) or not all(type(o) is int for o in (begin, end)):
            raise ValueError(f"{path.name}: malformed entry for {name!r}")
        itemsize = FROM_NAME[info["dtype"]].itemsize
        if not 0 <= begin <= end <= data_size or end - begin != math.prod(shape) * itemsize or begin % itemsize:
            raise ValueError(f"{path.name}: {name!r} does not fit its place in the file")
    return 8 + length, header


def load_tensors_mmap(path: Path) -> dict[str, torch.Tensor]:
    """Tensors as copy-on-write views of a memory map: pages are read from disk only when touched."""
    start, header = read_header(path)
    if start == path.stat().st_size:  # no data at all (np.memmap refuses an empty map)
        return {name: torch.empty(info["shape"], dtype=FROM_NAME[info["dtype"]]) for name, info in header.items()}
    mapped = np.memmap(path, dtype=np.uint8, mode="c")
    data = torch.from_numpy(mapped[start:])
    tensors = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype, shape = FROM_NAME[info["dtype"]], info["shape"]
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors
