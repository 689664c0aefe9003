"""Reading safetensors files by memory map, one tensor at a time, bfloat16 included.

The format: 8 bytes (little-endian u64) giving the header's length N, N bytes of JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the tensors' bytes, offsets counted from the end of the header. Mapping the file means
the operating system reads a tensor's pages only when it is converted, and drops them after:
a checkpoint never needs to fit in memory twice. NumPy has no bfloat16 (most Llama-family
checkpoints are stored in it), but a bfloat16 is the top half of a float32: shifted left by
16 bits it becomes that float32 exactly.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from tinygpt.files import give_umask_mode

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class SafetensorsFile:
    """The tensors of one .safetensors file: keys(), shape(name), array(name) (host NumPy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            size = self.path.stat().st_size
            if n > size - 8:
                raise ValueError(f"{self.path} is not a safetensors file (header length {n} > file size {size})")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{self.path}: the safetensors header is not JSON ({e})") from None
        header.pop("__metadata__", None)
        self.header, self.data_start, self.size = header, 8 + n, size

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def array(self, name: str) -> np.ndarray:
        """The tensor as a NumPy array backed by the mapped file (bfloat16 converted to float32)."""
        entry = self.header[name]
        if entry["dtype"] not in DTYPES:
            raise ValueError(f"{self.path.name}: tensor {name} has dtype {entry['dtype']}, which tinygpt does not read")
        begin, end = entry["data_offsets"]
        dtype, shape = np.dtype(DTYPES[entry["dtype"]]).newbyteorder("<"), tuple(entry["shape"])
        if end - begin != dtype.itemsize * int(np.prod(shape)) or self.data_start + end > self.size:
            raise ValueError(f"{self.path.name}: tensor {name} of shape {shape} and dtype {entry['dtype']} does not "
                             f"fit its bytes [{begin}, {end}) (is the file truncated?)")
        if end == begin:  # an empty tensor: nothing to map
            return np.zeros(shape, np.float32 if entry["dtype"] == "BF16" else dtype)
        array = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data_start + begin, shape=shape or (1,)).reshape(shape)
        if entry["dtype"] == "BF16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array


def save_safetensors(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    """Write host arrays as a safetensors file with the metadata transformers requires."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})
    give_umask_mode(path)  # save_file makes it 0600
