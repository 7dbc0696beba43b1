"""Mask: the kept routed-expert ids of every MoE layer.

A mask is derived from a pattern's scores and a budget at serve time (store/budget.py), so a
budget can change without re-indexing. JSON form: {"num_experts": E, "layers": [[ids], ...]}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_atomic
from domex.errors import MaskError


@dataclass(frozen=True)
class Mask:
    num_experts: int
    layers: tuple[tuple[int, ...], ...]  # [L][K_l] kept ids, sorted ascending

    @classmethod
    def of(cls, num_experts: int, layers) -> "Mask":
        """Build from any nested int sequence; checks ids and duplicates, sorts each layer."""
        out = []
        for l, ids in enumerate(layers):
            ids = [int(i) for i in ids]
            bad = [i for i in ids if not 0 <= i < num_experts]
            if bad:
                raise MaskError(
                    f"mask layer {l}: expert ids {bad[:8]} are out of range; this model has "
                    f"{num_experts} routed experts per layer (valid ids 0..{num_experts - 1})"
                )
            if len(set(ids)) != len(ids):
                dup = sorted({i for i in ids if ids.count(i) > 1})
                raise MaskError(f"mask layer {l}: expert ids {dup[:8]} appear more than once; list each kept expert once")
            out.append(tuple(sorted(ids)))
        return cls(num_experts, tuple(out))

    @classmethod
    def full(cls, num_layers: int, num_experts: int) -> "Mask":
        return cls(num_experts, tuple(tuple(range(num_experts)) for _ in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def kept_counts(self) -> list[int]:
        return [len(ids) for ids in self.layers]

    def is_uniform(self) -> bool:
        return len(set(self.kept_counts())) <= 1

    def fraction(self) -> float:
        return sum(self.kept_counts()) / (self.num_layers * self.num_experts)

    def union(self, other: "Mask") -> "Mask":
        if (self.num_layers, self.num_experts) != (other.num_layers, other.num_experts):
            raise MaskError(
                f"cannot unite masks of different shapes: {self.num_layers}x{self.num_experts} "
                f"and {other.num_layers}x{other.num_experts}"
            )
        return Mask.of(self.num_experts, [sorted(set(a) | set(b)) for a, b in zip(self.layers, other.layers)])

    def check(self, num_layers: int, num_experts: int, top_k: int) -> None:
        """Refuse a mask the model cannot route with: the message names the layer and the problem."""
        if self.num_experts != num_experts:
            raise MaskError(f"mask is for {self.num_experts} routed experts per layer, the model has {num_experts}")
        if self.num_layers != num_layers:
            raise MaskError(
                f"mask has {self.num_layers} layers, the model has {num_layers} MoE layers; "
                "give one list of kept expert ids per MoE layer"
            )
        Mask.of(num_experts, self.layers)
        for l, ids in enumerate(self.layers):
            if len(ids) < top_k:
                raise MaskError(
                    f"mask layer {l}: keeps {len(ids)} experts but the router selects top_k={top_k} "
                    f"per token; keep at least {top_k}"
                )

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "layers": [list(ids) for ids in self.layers]}

    @classmethod
    def from_json(cls, data: dict, where: str = "mask") -> "Mask":
        if not isinstance(data, dict) or "layers" not in data or "num_experts" not in data:
            raise MaskError(f"{where}: expected an object with fields 'num_experts' and 'layers'")
        return cls.of(int(data["num_experts"]), data["layers"])

    def save(self, path: str | Path) -> None:
        write_atomic(path, json.dumps(self.to_json()).encode())

    @classmethod
    def load(cls, path: str | Path) -> "Mask":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MaskError(f"{path}: mask file not found") from None
        except json.JSONDecodeError as e:
            raise MaskError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None
        return cls.from_json(data, where=str(path))
