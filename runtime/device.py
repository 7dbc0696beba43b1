"""Device: the one place that knows about accelerators (CUDA); everything else asks here.

The expert cache copies experts host -> device. On CPU the pool is read straight into the slot
buffers. On CUDA it is read into a pinned staging buffer and copied with non_blocking=True, so
the copy overlaps the next read; a fence makes sure the staging bytes are not overwritten while
a copy from them is still in flight.
"""

from __future__ import annotations

import torch

from domex.errors import ConfigError


def resolve(device: str | torch.device) -> torch.device:
    """A torch.device, refusing an accelerator this machine does not have (with what to pass instead)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} was asked for but CUDA is not available here; pass device='cpu' (--device cpu)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def needs_staging(device: torch.device) -> bool:
    """True when slot buffers live off the host, so reads go through a pinned staging buffer."""
    return device.type == "cuda"


def pinned_bytes(nbytes: int) -> torch.Tensor:
    """A page-locked host buffer of nbytes (uint8): DMA-able, so device copies from it can be async."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def staging_bytes(nbytes: int, device: torch.device) -> torch.Tensor:
    """Host bytes that pool reads land in before a copy into the slots: pinned for an accelerator."""
    return pinned_bytes(nbytes) if needs_staging(device) else torch.empty(nbytes, dtype=torch.uint8)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype(name: str, device: torch.device, checkpoint: torch.dtype) -> torch.dtype:
    """The dtype a model computes in. 'auto': the checkpoint's on an accelerator; float32 on CPU, where
    half-precision matmuls without native support run several times slower (8x measured on this
    project's 2-core x86 machine) and padding alone changes bf16 results (so batches differ from solo runs)."""
    if name == "auto":
        return checkpoint if needs_staging(device) else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use auto or one of {', '.join(DTYPES)} (--dtype)")
    return DTYPES[name]


class Fence:
    """Marks the point after the copies issued so far; wait() blocks the host until they are done."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        if self.event is not None:
            self.event.record()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing, and before handing slot buffers to a forward)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
