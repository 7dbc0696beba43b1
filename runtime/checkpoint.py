"""Safetensors files read and written by byte offsets, and the source HF checkpoint they come from.

No whole-file loads and no memory map kept alive: a tensor (or one expert's slice of a fused one)
is read with one pread into the caller's buffer, and a file is written by streaming tensors in
order after a header that says where each goes. The pool (runtime/pool.py) and the compact export
(runtime/export.py) are both written this way.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from domex.errors import PoolError
from domex.store.atomic import replacing

ALIGN = 4096  # data sections start on a page boundary

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ST_NAME = {v: k for k, v in DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)




@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries (absolute offsets) and __metadata__ of a safetensors file, from its header only."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise PoolError(f"{path}: truncated safetensors file ({len(head)} bytes); rebuild it")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PoolError(f"{path}: unreadable safetensors header ({e}); the file is corrupt, rebuild it") from None
    meta = header.pop("__metadata__", None) or {}
    start = 8 + n
    entries = {}
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise PoolError(f"{path}: tensor {name} has dtype {h['dtype']}, which domex cannot read")
        b, e = h["data_offsets"]
        entries[name] = TensorEntry(DTYPES[h["dtype"]], tuple(h["shape"]), start + b, start + e)
    return entries, meta


def _as_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def pread_into(fd: int, buffers: list[torch.Tensor], offset: int, path: Path | str = "") -> None:
    """Fill CPU tensors, in order, from one contiguous byte range of a file (one preadv, looped if short)."""
    views = [_as_bytes(b) if b.is_contiguous() else None for b in buffers]
    assert all(v is not None for v in views), "pread_into needs contiguous buffers"
    want = sum(v.nbytes for v in views)
    done = 0
    while done < want:
        n = os.preadv(fd, _skip(views, done), offset + done)
        if n == 0:
            raise PoolError(f"{path}: file ends at byte {offset + done}, expected {want - done} more bytes; "
                            "the file is truncated, rebuild the pool with `domex pool build`")
        done += n


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n >= v.nbytes:
            n -= v.nbytes
            continue
        out.append(v[n:])
        n = 0
    return out


def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      tensors: Iterable[torch.Tensor], metadata: dict[str, str],
                      on_record: Callable[[str, memoryview], None] | None = None) -> None:
    """Stream tensors into a safetensors file in the given order: header first (from specs), then bytes.

    Written beside `path`, fsynced, renamed (store.atomic.replacing): a reader that has the old file open keeps a whole file.
    The header is padded with spaces so the data section starts on a page boundary.
    """
    header, offset = {"__metadata__": metadata}, 0
    for name, dtype, shape in specs:
        nbytes = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": ST_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            assert t.dtype == dtype and tuple(t.shape) == tuple(shape), (name, t.dtype, t.shape, dtype, shape)
            data = _as_bytes(t)
            f.write(data)
            if on_record:
                on_record(name, data)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n




class Checkpoint:
    """An HF checkpoint folder: sharded (model.safetensors.index.json) or single file; reads by offset."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not (self.dir / "config.json").is_file():
            raise PoolError(f"{self.dir}: no config.json; give the folder of an HF checkpoint (config.json + *.safetensors)")
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise PoolError(f"{self.dir}: no *.safetensors files; domex reads safetensors checkpoints only "
                            "(convert .bin weights with transformers' save_pretrained first)")
        self.entries: dict[str, tuple[Path, TensorEntry]] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise PoolError(f"{path}: shard listed in model.safetensors.index.json is missing")
            entries, _ = read_header(path)
            self.entries.update({k: (path, v) for k, v in entries.items()})
        self._fds: dict[Path, int] = {}

    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text())

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def read(self, key: str) -> torch.Tensor:
        """One whole tensor, read into fresh memory."""
        path, e = self.entries[key]
        out = torch.empty(e.shape, dtype=e.dtype)
        pread_into(self._fd(path), [out], e.begin, path)
        return out

    def read_row(self, key: str, i: int) -> torch.Tensor:
        """Row i of the leading dimension (expert i of a fused [E, ...] tensor), reading only its bytes."""
        path, e = self.entries[key]
        out = torch.empty(e.shape[1:], dtype=e.dtype)
        pread_into(self._fd(path), [out], e.begin + i * out.nbytes, path)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json (canonical JSON), every tensor's name, dtype and shape, and 64 bytes of
    up to 16 tensors spread over the sorted names: cheap, and different for another model or another
    training run of the same architecture."""
    ckpt = Checkpoint(model_dir)
    h = hashlib.sha256()
    config = ckpt.config()
    config.pop("transformers_version", None)
    h.update(json.dumps(config, sort_keys=True).encode())
    names = sorted(ckpt.entries)
    for name in names:
        e = ckpt.entries[name][1]
        h.update(f"{name}|{dtype_name(e.dtype)}|{list(e.shape)}\n".encode())
    for name in names[:: max(1, len(names) // 16)][:16]:
        path, e = ckpt.entries[name]
        h.update(os.pread(ckpt._fd(path), min(64, e.end - e.begin), e.begin))
    ckpt.close()
    return h.hexdigest()
