"""Quantised expert tiers (DESIGN §11): an expert held at 8 or 4 bits, dequantised when it is used.

    int8  per-output-channel symmetric: s[o] = max|W[o, :]| / 127, q = round(W / s) in [-127, 127]
          bytes: 1 per weight + 4 per output row (fp32 scale)
    int4  group-wise symmetric along the input dimension, group size GROUP = 32 (the whole row when the
          input dimension is not a multiple of 32): s[o, g] = max|W[o, group g]| / 7, q in [-7, 7],
          two weights per byte (low nibble first, stored as q + 8); bytes: 1/2 per weight + 4 per group

Round-to-nearest bounds the error of every weight by half a step: |W - deq(q)| <= s / 2, i.e.
max|row| / 254 for int8 and max|group| / 14 for int4 (checked by the tests).

Only matrices (2-D per expert: [out, in]) are quantised; an expert's vectors (GPT-OSS biases) stay in
the pool's dtype inside the tier's record. A tier's record of one expert lists its parts in order:
for each parameter `p` of the expert, either `p` (kept as is) or `p.q` and `p.scale`.

Legend: O output rows, I input columns, G groups per row.
"""

from __future__ import annotations

import torch

from domex.errors import ConfigError

GROUP = 32
TIERS = ("int8", "int4")  # quantised tiers; the pool's own dtype is the base tier


def check_tiers(names) -> tuple[str, ...]:
    """The quantised tiers of `names` (e.g. 'bf16,int8,int4'); a float dtype name means the base tier."""
    names = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in names if n not in TIERS and n not in ("bf16", "bfloat16", "fp16", "float16", "fp32", "float32")]
    if unknown:
        raise ConfigError(f"unknown tier(s) {', '.join(unknown)}; tiers are the pool's dtype (bf16), int8 and int4 (--tiers)")
    return tuple(t for t in TIERS if t in names)


def group_size(columns: int) -> int:
    return GROUP if columns % GROUP == 0 else columns


def quantise(weight: torch.Tensor, tier: str) -> dict[str, torch.Tensor]:
    """{"q": codes, "scale": fp32 scales} of a matrix [O, I] at `tier`."""
    w = weight.float()
    if tier == "int8":
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # [O]
        return {"q": torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), "scale": scale}
    O, I = w.shape
    g = group_size(I)
    groups = w.reshape(O, I // g, g)  # [O, G, g]
    scale = (groups.abs().amax(dim=2) / 7).clamp_min(1e-12)  # [O, G]
    q = (torch.round(groups / scale[..., None]).clamp(-7, 7) + 8).to(torch.uint8).reshape(O, I)  # 1..15
    if I % 2:
        raise ConfigError(f"int4 packs two weights per byte; a matrix with {I} input columns cannot be packed")
    return {"q": q[:, 0::2] | (q[:, 1::2] << 4), "scale": scale}  # [O, I/2]


def dequantise(q: torch.Tensor, scale: torch.Tensor, tier: str, dtype: torch.dtype) -> torch.Tensor:
    """The matrix [O, I] a tier's codes stand for, in `dtype`."""
    if tier == "int8":
        return (q.float() * scale[:, None]).to(dtype)
    O = q.shape[0]
    codes = torch.stack([q & 0x0F, q >> 4], dim=2).reshape(O, -1).float() - 8  # [O, I]
    I = codes.shape[1]
    g = group_size(I)
    return (codes.reshape(O, I // g, g) * scale[..., None]).reshape(O, I).to(dtype)


def parts(shape: tuple[int, ...], dtype: torch.dtype, tier: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(suffix, dtype, shape) of the parts one expert parameter of this shape takes in a tier's record."""
    if len(shape) != 2:
        return [("", dtype, shape)]
    O, I = shape
    if tier == "int8":
        return [(".q", torch.int8, (O, I)), (".scale", torch.float32, (O,))]
    return [(".q", torch.uint8, (O, I // 2)), (".scale", torch.float32, (O, I // group_size(I)))]


def encode(params: dict[str, torch.Tensor], tier: str) -> dict[str, torch.Tensor]:
    """One expert's parameters {name: tensor} as its tier record {name + suffix: tensor}, in `parts` order."""
    out = {}
    for name, t in params.items():
        if t.dim() != 2:
            out[name] = t
            continue
        coded = quantise(t, tier)
        out[name + ".q"], out[name + ".scale"] = coded["q"], coded["scale"]
    return out


def relative_error(params: dict[str, torch.Tensor], record: dict[str, torch.Tensor], tier: str) -> float:
    """||W - deq(W)|| / ||W|| over all of one expert's matrices (Frobenius): the plan's value model reads it."""
    restored = decode(record, list(params), tier, torch.float32)
    num = sum(float((params[n].float() - restored[n]).pow(2).sum()) for n in params)
    den = sum(float(params[n].float().pow(2).sum()) for n in params)
    return (num / den) ** 0.5 if den > 0 else 0.0


def decode(record: dict[str, torch.Tensor], names: list[str], tier: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """An expert's parameters back from its tier record, dequantised to `dtype`."""
    return {n: record[n].to(dtype) if n in record else dequantise(record[n + ".q"], record[n + ".scale"], tier, dtype)
            for n in names}
