"""Export: a domain's mask written as a compact standard HF checkpoint that vLLM / SGLang / transformers load.

    mask (store + domain(s) + budget, or mask.json) -> check uniform K -> per MoE layer keep K experts,
    renumbered 0..K-1 in ascending original id -> router rows (+ router bias, e_score_correction_bias)
    sliced the same way -> config count key = K (DeepSeek groups kept or disabled) -> safetensors shards
    + config + tokenizer + generation config + domex_export.json (provenance), in a temp dir, renamed.

Why uniform K: vLLM's FusedMoE and SGLang build one `[E, ...]` expert tensor per layer from one
config value, so every MoE layer must keep the same number of experts; a non-uniform mask (the
`coverage` rule) is refused rather than padded.

Routing of the compact checkpoint, per rule (it equals domex's restricted routing of the source):
- softmax with renormalisation (Mixtral, Qwen3-MoE): identical to masking logits to -inf.
- softmax without renormalisation (Qwen2-MoE, OLMoE defaults): the compact model's softmax runs over
  the K kept experts only, i.e. domex's default `renormalize` restriction mode, not `full_softmax`.
- sigmoid + correction bias + groups (DeepSeek-V3): grouping is kept when every original group keeps
  the same count c >= 2 with c * topk_group >= top_k (renumbered groups = original groups, K divisible
  by n_group); otherwise n_group = topk_group = 1 is written with a warning, and routing then differs
  from the source's group-limited routing (it equals domex's restriction of a source with groups off).
- top-k then softmax with router bias (GPT-OSS): identical to masking logits to -inf.

Streams tensor by tensor from the expert pool: peak memory is one tensor (one fused expert tensor of
K experts for fused-on-disk families), never the model.

Legend: L MoE layers, E routed experts, K kept experts per layer, H hidden, I expert intermediate.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from domex.store.budget import Budget, domain_mask
from domex.errors import ExportError
from domex.store.atomic import replacing, write_atomic
from domex.store.mask import Mask
from domex.store.scores import PRIMARY

from .families import Adapter
from .checkpoint import DTYPES, _numel, write_safetensors
from .pool import COPIED, Pool, open_pool

INFO = "domex_export.json"
SHARD_BYTES = 4 << 30  # like HF's default max_shard_size order of magnitude; vLLM reads any shard count

Tensors = Callable[[], Iterator[torch.Tensor]]


@dataclass(frozen=True)
class Unit:
    """Tensors written together (one non-expert tensor, one expert's keys, one fused parameter): specs + producer."""

    specs: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...]
    produce: Tensors

    @property
    def nbytes(self) -> int:
        return sum(d.itemsize * _numel(s) for _, d, s in self.specs)


@dataclass(frozen=True)
class Grouping:
    """What happens to group-limited routing: kept (renumbered groups = original groups) or disabled."""

    kept: bool
    n_group: int
    topk_group: int
    reason: str = ""


@dataclass(frozen=True)
class ExportReport:
    out_dir: str
    kept_per_layer: int  # K
    num_experts: int  # E of the source
    grouping: Grouping | None
    files_bytes: int  # everything written under out_dir
    weights_bytes: int  # tensor bytes of the export
    source_weights_bytes: int  # tensor bytes of the full model (non-experts + L * E experts)
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# checks


def kept_count(mask: Mask) -> int:
    """K of a uniform mask; ExportError for a non-uniform one."""
    counts = mask.kept_counts()
    if not mask.is_uniform():
        raise ExportError(
            f"the mask keeps a different number of experts per MoE layer (min {min(counts)}, max {max(counts)}); "
            "a compact checkpoint needs one expert count for the whole model because vLLM and SGLang read a single "
            "num_experts from config.json and build one [E, ...] tensor per layer; select with the uniform rule "
            "(the default, not --rule coverage), or serve this mask with `domex serve` instead"
        )
    return counts[0]


def plan_grouping(adapter: Adapter, config: dict, mask: Mask, top_k: int) -> Grouping | None:
    """Keep group-limited routing when every original group keeps the same count c >= 2 with c * topk_group >= top_k."""
    if adapter.group_keys is None:
        return None
    g_key, tg_key = adapter.group_keys
    n_group, topk_group = int(config.get(g_key) or 1), int(config.get(tg_key) or 1)
    if n_group <= 1:
        return Grouping(True, n_group, topk_group)
    per_group = mask.num_experts // n_group
    for l, ids in enumerate(mask.layers):
        counts = [0] * n_group  # [G] kept experts of each original group
        for e in ids:
            counts[e // per_group] += 1
        c = counts[0]
        if any(n != c for n in counts):
            why = f"MoE layer {l} keeps {counts} experts in the {n_group} groups, not an equal number per group"
        elif c < 2:
            why = f"each group keeps {c} expert, and group scores need the best two of a group"
        elif c * topk_group < top_k:
            why = f"{topk_group} chosen groups of {c} kept experts hold fewer than top_k={top_k}"
        else:
            continue
        return Grouping(False, 1, 1, why)
    return Grouping(True, n_group, topk_group)


# ---------------------------------------------------------------------------------------------
# the tensors of the compact checkpoint, as units in write order


def _router_layer(pool: Pool, disk_name: str) -> int | None:
    """The MoE layer whose router holds `disk_name` (weight, bias, e_score_correction_bias), else None."""
    for l, layer in enumerate(pool.manifest.moe_layers):
        if disk_name.startswith(pool.adapter.router_prefix.format(l=layer)):
            return l
    return None


def _units(pool: Pool, mask: Mask) -> list[Unit]:
    from safetensors import safe_open

    m, adapter = pool.manifest, pool.adapter
    units = []
    path = pool.dir / m.non_expert_file
    with safe_open(path, "pt") as f:
        names = list(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        dtypes = {n: f.get_slice(n).get_dtype() for n in names}

    for name in names:
        disk = adapter.disk_name(name)
        l = _router_layer(pool, disk)
        shape, dtype = shapes[name], DTYPES[dtypes[name]]
        kept = None
        if l is not None and shape and shape[0] == m.num_experts:
            kept = list(mask.layers[l])
            shape = (len(kept), *shape[1:])  # [K, ...] from [E, ...]

        def produce(name=name, kept=kept):
            with safe_open(path, "pt") as f:
                t = f.get_tensor(name)
            yield t if kept is None else t[kept].contiguous()

        units.append(Unit(((disk, dtype, shape),), produce))

    meta = {p.name: torch.empty(p.shape, dtype=getattr(torch, p.dtype), device="meta") for p in m.expert_params}
    for l, layer in enumerate(m.moe_layers):
        kept = mask.layers[l]
        if adapter.per_expert is not None:
            for j, e in enumerate(kept):
                specs = tuple((adapter.disk_name(k), t.dtype, tuple(t.shape))
                              for k, t in adapter.per_expert.write(layer, j, meta).items())

                def produce(l=l, layer=layer, j=j, e=e):
                    yield from adapter.per_expert.write(layer, j, pool.read_expert(l, e)).values()

                units.append(Unit(specs, produce))
        else:
            for key, p in zip(adapter.fused.tensor_keys(layer), m.expert_params):
                def produce(l=l, kept=kept, p=p):
                    yield pool.read_layer(l, kept)[p.name]  # [K, ...]

                units.append(Unit(((adapter.disk_name(key), getattr(torch, p.dtype), (len(kept), *p.shape)),), produce))
    return units


def _shards(units: list[Unit], shard_bytes: int) -> list[list[Unit]]:
    shards, size = [[]], 0
    for u in units:
        if shards[-1] and size + u.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


def _write_weights(out: Path, units: list[Unit], shard_bytes: int) -> int:
    shards = _shards(units, shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for name, shard in zip(names, shards):
        specs = [s for u in shard for s in u.specs]
        write_safetensors(out / name, specs, (t for u in shard for t in u.produce()), {"format": "pt"})
        weight_map.update({s[0]: name for s in specs})
        total += sum(u.nbytes for u in shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(out / "model.safetensors.index.json", json.dumps(index, indent=2).encode())
    return total


# ---------------------------------------------------------------------------------------------
# export


def export(pool: "Pool | str | Path", mask: Mask, out_dir: str | Path, *, provenance: dict | None = None,
           shard_bytes: int = SHARD_BYTES) -> ExportReport:
    """Write the compact checkpoint of `mask` to `out_dir` (must not exist or be empty); see the module docstring."""
    owned = not isinstance(pool, Pool)
    pool = open_pool(pool)
    try:
        return _export(pool, mask, Path(out_dir), provenance or {}, shard_bytes)
    finally:
        if owned:
            pool.close()


def _set(config: dict, model_type: str, key: str, value) -> None:
    """Set a config.json field under its own name and under the name its config class stores it as
    (transformers 5 aliases e.g. Qwen3-MoE's `num_experts` to `num_local_experts` via attribute_map)."""
    from transformers import CONFIG_MAPPING

    stored = CONFIG_MAPPING[model_type].attribute_map.get(key, key)
    for name in {key, stored}:
        if name in config or name == stored:
            config[name] = value


def _export(pool: Pool, mask: Mask, out: Path, provenance: dict, shard_bytes: int) -> ExportReport:
    m, adapter = pool.manifest, pool.adapter
    mask.check(m.num_layers, m.num_experts, m.top_k)
    k = kept_count(mask)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; give a new OUT_DIR or remove the old export first")
    config = dict(m.config)
    _set(config, m.model_type, adapter.count_key, k)
    grouping = plan_grouping(adapter, config, mask, m.top_k)
    notes = []
    if grouping is not None and not grouping.kept:
        g_key, tg_key = adapter.group_keys
        notes.append(f"group-limited routing disabled in the export ({g_key}=topk_group=1: {grouping.reason}); "
                     "the compact model then routes by plain top-k over the kept experts, which differs from the "
                     "source model's group-limited routing; keep an equal number of experts (>= 2) per group to keep it")
        _set(config, m.model_type, g_key, 1)
        _set(config, m.model_type, tg_key, 1)
        warnings.warn(notes[-1], stacklevel=3)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights = _write_weights(tmp, _units(pool, mask), shard_bytes)
        write_atomic(tmp / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
        for name in COPIED:
            if name != "config.json" and (pool.dir / name).is_file():
                with replacing(tmp / name) as part:
                    shutil.copyfile(pool.dir / name, part)
        source = m.non_expert_bytes + m.num_layers * m.num_experts * m.expert_bytes
        info = {
            "format": "domex-export", "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "source_fingerprint": m.fingerprint, "source_pool": str(pool.dir.resolve()), "model_type": m.model_type,
            **provenance,
            "num_experts": m.num_experts, "kept_per_layer": k, "top_k": m.top_k,
            "grouping": asdict(grouping) if grouping else None, "warnings": notes,
            "kept": {str(layer): list(ids) for layer, ids in zip(m.moe_layers, mask.layers)},  # decoder layer -> ids
            "sizes": {"expert_bytes": m.expert_bytes, "non_expert_bytes": m.non_expert_bytes,
                      "routed_bytes_source": m.num_layers * m.num_experts * m.expert_bytes,
                      "routed_bytes_kept": m.num_layers * k * m.expert_bytes,
                      "weights_bytes_source": source, "weights_bytes": weights,
                      "fraction_of_source": weights / source},
        }
        write_atomic(tmp / INFO, (json.dumps(info, indent=1) + "\n").encode())
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return ExportReport(str(out), k, m.num_experts, grouping, files, weights, source, tuple(notes))


def store_mask(pool: Pool, store_dir: str | Path, domains: list[str], budget: str, *, criterion: str = PRIMARY,
               rule: str = "uniform") -> Mask:
    """The mask `domex serve` would use for these domain(s) under this budget."""
    from domex.store.db import Store

    store = Store.open(store_dir, create=False)
    patterns = [store.get(name) for name in domains]
    for name, p in zip(domains, patterns):
        pool.check_fingerprint(p.fingerprint, f"domain {name!r} in store {store_dir}")
    return domain_mask(patterns, Budget.parse(budget), criterion=criterion, rule=rule)


def export_command(pool: str, out_dir: str, store: str | None = None, domain: list[str] | None = None,
                   budget: str | None = None, criterion: str = PRIMARY, rule: str = "uniform", mask: str | None = None) -> int:
    """`domex export`: mask from --mask or --store/--domain/--budget, then export()."""
    with Pool(pool) as opened:
        if mask:
            if domain or store:
                raise ExportError("give either --mask or --store/--domain/--budget, not both")
            kept = Mask.load(mask)
            provenance = {"mask_file": str(Path(mask).resolve())}
        else:
            if not (store and domain and budget):
                raise ExportError("say which experts to keep: --store S --domain NAME --budget B (or --mask mask.json)")
            kept = store_mask(opened, store, domain, budget, criterion=criterion, rule=rule)
            provenance = {"store": str(Path(store).resolve()), "domains": list(domain), "criterion": criterion,
                          "budget": budget, "rule": rule}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same text is printed below
            report = export(opened, kept, out_dir, provenance=provenance)
    for note in report.warnings:
        print(f"warning: {note}")
    print(f"exported {report.out_dir}: K={report.kept_per_layer} of E={report.num_experts} experts per MoE layer, "
          f"{report.weights_bytes / 2**20:.1f} MiB of weights ({report.weights_bytes / report.source_weights_bytes:.1%} "
          f"of {report.source_weights_bytes / 2**20:.1f} MiB)")
    return 0
