"""Expert pool: an HF MoE checkpoint converted once into files that one expert can be read from in one go.

    POOL_DIR/
      manifest.json             format version, fingerprint, family, config, expert layout, offsets, checksums
      non_experts.safetensors   every weight but the routed experts, under the in-memory (transformers) names
      experts/layer_NNN.safetensors   one per MoE layer (NNN = decoder layer), expert-major:
                                tensors e0000.gate_up_proj, e0000.down_proj, e0001.gate_up_proj, ...
                                so expert e is the byte range [data_start + e * expert_bytes, + expert_bytes)
      experts/layer_NNN.int8.safetensors, .int4.   optional quantised tiers (`--tiers`, runtime/quant.py), laid
                                out the same way: e0000.gate_up_proj.q, e0000.gate_up_proj.scale, ...
      config.json, tokenizer files, generation_config.json   copied from the model

The layer files are valid safetensors (any reader can open them); domex reads one expert with one
`preadv` straight into its slot buffers. Each expert's bytes carry a crc32 in the manifest, checked
the first time the expert is read in a process, or all at once by `Pool.verify_checksums()`
(`domex serve --verify-pool`); opening a pool checks every file's presence, size and fingerprint. Building streams one tensor at a time (one expert at
a time for per-expert checkpoints), so peak memory stays near the largest single tensor.

Legend: L MoE layers, E routed experts, H hidden, I expert intermediate size.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from domex.errors import FingerprintMismatch, PoolError
from domex.store.atomic import replacing, write_atomic

from .checkpoint import Checkpoint, _as_bytes, _numel, dtype_name, dtype_of, fingerprint, pread_into, read_header, write_safetensors
from .families import Adapter, adapter_for
from .quant import check_tiers, encode, parts, relative_error

FORMAT = "domex-expert-pool"
VERSION = 1
MANIFEST = "manifest.json"
NON_EXPERTS = "non_experts.safetensors"
LOCK = ".pool.lock"
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
          "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")

# ---------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class ExpertParam:
    """One parameter of one expert inside an expert's record: in-memory name, shape without E, offset."""

    name: str  # e.g. "gate_up_proj"
    shape: tuple[int, ...]  # e.g. (2I, H)
    dtype: str  # torch dtype name, e.g. "bfloat16"
    offset: int  # bytes from the start of the expert's record
    nbytes: int


@dataclass(frozen=True)
class Tier:
    """One quantised tier's files: its record layout and where each expert's record starts."""

    expert_params: tuple[ExpertParam, ...]  # the record's parts, e.g. gate_up_proj.q, gate_up_proj.scale, ...
    expert_bytes: int
    layer_files: tuple[str, ...]  # [L]
    data_start: tuple[int, ...]  # [L]
    checksums: tuple[tuple[int, ...], ...]  # [L][E]
    errors: tuple[tuple[float, ...], ...]  # [L][E] relative Frobenius error of each expert's dequantised weights

    @classmethod
    def from_json(cls, data: dict) -> "Tier":
        return cls(tuple(ExpertParam(p["name"], tuple(p["shape"]), p["dtype"], p["offset"], p["nbytes"])
                         for p in data["expert_params"]), data["expert_bytes"], tuple(data["layer_files"]),
                   tuple(data["data_start"]), tuple(tuple(c) for c in data["checksums"]),
                   tuple(tuple(e) for e in data["errors"]))


def record_layout(parts: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[tuple[ExpertParam, ...], int]:
    """Consecutive ExpertParams of (name, dtype, shape) parts, and the record's total bytes."""
    params, offset = [], 0
    for name, dtype, shape in parts:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        params.append(ExpertParam(name, tuple(shape), dtype_name(dtype), offset, nbytes))
        offset += nbytes
    return tuple(params), offset


@dataclass(frozen=True)
class PoolManifest:
    fingerprint: str
    model_type: str
    config: dict
    num_experts: int  # E
    top_k: int
    moe_layers: tuple[int, ...]  # [L] decoder layer index of each MoE layer
    experts_module: tuple[str, ...]  # [L] qualified name of each MoE layer's experts module
    expert_params: tuple[ExpertParam, ...]
    expert_bytes: int  # one expert's record
    layer_files: tuple[str, ...]  # [L] relative to the pool dir
    data_start: tuple[int, ...]  # [L] byte offset of expert 0 in each layer file
    checksums: tuple[tuple[int, ...], ...]  # [L][E] crc32 of each expert's record
    non_expert_file: str
    non_expert_bytes: int
    file_sizes: dict  # relative path -> bytes
    source_layout: str  # "per_expert" | "fused": how the checkpoint stored the experts
    version: int = VERSION
    tiers: dict = field(default_factory=dict)  # quantised tier name -> Tier (pools built without --tiers: none)

    @property
    def num_layers(self) -> int:
        return len(self.moe_layers)

    def offset(self, l: int, e: int) -> int:
        """Byte offset of expert e of MoE layer l in its layer file."""
        return self.data_start[l] + e * self.expert_bytes

    @property
    def base_tier(self) -> str:
        """The name of the tier the experts are stored at as the checkpoint had them, e.g. 'bfloat16'."""
        return self.expert_params[0].dtype

    def tier_bytes(self, tier: str) -> int:
        """Bytes of one expert's record at `tier` (the base tier's or a quantised one's)."""
        if tier == self.base_tier:
            return self.expert_bytes
        if tier not in self.tiers:
            raise PoolError(f"the pool has no {tier} tier (it holds: {', '.join([self.base_tier, *self.tiers])}); "
                            f"rebuild it with `domex pool build MODEL_DIR POOL_DIR --tiers {tier}`")
        return self.tiers[tier].expert_bytes

    def novice_bytes(self, hidden: int) -> int:
        """Bytes of one novice vector: `hidden` values at the pool's dtype."""
        return hidden * torch.empty((), dtype=dtype_of(self.base_tier)).element_size()

    def tier_table(self, names=None) -> tuple[dict[str, int], dict]:
        """(tier -> one expert's bytes, tier -> [L, E] relative weight errors) for plans (store/plan.py):
        the base tier and the quantised tiers among `names` (default: all the pool holds)."""
        import numpy as np

        chosen = [t for t in self.tiers if names is None or t in check_tiers(names)]
        return ({self.base_tier: self.expert_bytes, **{t: self.tiers[t].expert_bytes for t in chosen}},
                {t: np.array(self.tiers[t].errors) for t in chosen})

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str = MANIFEST) -> "PoolManifest":
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise PoolError(f"{where}: not a domex pool manifest of version {VERSION} (format {data.get('format')!r}, "
                            f"version {data.get('version')!r}); rebuild the pool with `domex pool build MODEL_DIR POOL_DIR`")
        data = {k: v for k, v in data.items() if k != "format"}
        data["expert_params"] = tuple(ExpertParam(p["name"], tuple(p["shape"]), p["dtype"], p["offset"], p["nbytes"])
                                      for p in data["expert_params"])
        data["checksums"] = tuple(tuple(c) for c in data["checksums"])
        data["tiers"] = {name: Tier.from_json(t) for name, t in data.get("tiers", {}).items()}
        for key in ("moe_layers", "experts_module", "layer_files", "data_start"):
            data[key] = tuple(data[key])
        return cls(**data)

    @classmethod
    def from_dir(cls, pool_dir: str | Path) -> "PoolManifest":
        path = Path(pool_dir) / MANIFEST
        if not path.is_file():
            raise PoolError(f"{pool_dir}: no {MANIFEST}, so this is not an expert pool (or its build did not finish); "
                            f"build one with `domex pool build MODEL_DIR {pool_dir}`")
        return cls.from_json(json.loads(path.read_text()), str(path))


# ---------------------------------------------------------------------------------------------
# building


@contextlib.contextmanager
def _locked(pool_dir: Path, exclusive: bool) -> Iterator[int]:
    try:
        fd = os.open(pool_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        if exclusive:
            raise PoolError(f"{pool_dir}: not writable, so no pool can be built there; give another POOL_DIR") from None
        yield -1  # a read-only pool cannot be rebuilt in place: nothing to guard against
        return
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        what = "open for serving (an Engine or another process holds it)" if exclusive else "being built"
        raise PoolError(f"{pool_dir}: the pool is {what}; "
                        + ("close it first, or build into another POOL_DIR" if exclusive else "wait for the build to finish")) from None
    try:
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def meta_model(config: dict) -> torch.nn.Module:
    """The transformers model of a config, every tensor on the meta device (no memory).

    Built with dtype=None: given the config's dtype (e.g. bfloat16), transformers would set torch's
    process-wide default dtype while building, and a server's other threads would make bf16 tensors
    meanwhile. The meta tensors come out in the default dtype; real ones get theirs from the pool.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    dtype = cfg.dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=None)
    model.config.dtype = dtype
    return model


def _expert_names(model: torch.nn.Module, adapter: Adapter) -> list[tuple[int, str]]:
    """(decoder layer, qualified experts module name) of every MoE layer."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(i, names[id(block.experts)]) for i, block in adapter.moe_blocks(model)]


def _expert_reader(ckpt: Checkpoint, adapter: Adapter, layer: int) -> tuple[str, Callable[[int], dict[str, torch.Tensor]]]:
    """How this checkpoint stores layer `layer`'s experts (fused keys or per-expert keys), and a reader of one expert."""
    fused_keys = adapter.fused.tensor_keys(layer)
    if all(k in ckpt for k in fused_keys):
        return "fused", lambda e: adapter.fused.read(ckpt.read_row, layer, e)
    if adapter.per_expert is not None and all(k in ckpt for k in adapter.per_expert.keys(layer, 0)):
        return "per_expert", lambda e: adapter.per_expert.read(ckpt.read, layer, e)
    wanted = fused_keys + (adapter.per_expert.keys(layer, 0) if adapter.per_expert else [])
    raise PoolError(f"{ckpt.dir}: decoder layer {layer} is an MoE layer but none of its expert keys were found "
                    f"(looked for {wanted}); the checkpoint does not match its config.json")


def build(model_dir: str | Path, pool_dir: str | Path, *, tiers=(), progress: bool = True) -> PoolManifest:
    """Convert an HF MoE checkpoint folder into an expert pool (see the module docstring for the layout).

    `tiers`: quantised tiers to store beside the checkpoint's dtype, e.g. ("int8", "int4")."""
    from tqdm import tqdm

    model_dir, pool_dir = Path(model_dir), Path(pool_dir)
    tiers = check_tiers(tiers)
    ckpt = Checkpoint(model_dir)
    config = ckpt.config()
    adapter = adapter_for(config.get("model_type"))
    if pool_dir.exists() and any(pool_dir.iterdir()) and not (pool_dir / MANIFEST).exists() \
            and not (pool_dir / LOCK).exists():
        raise PoolError(f"{pool_dir} exists, is not empty and is not an expert pool; give an empty or new POOL_DIR")
    (pool_dir / "experts").mkdir(parents=True, exist_ok=True)
    fp = fingerprint(model_dir)
    meta = {"domex_fingerprint": fp, "format": FORMAT}
    model = meta_model(config)
    num_experts = adapter.num_experts(model.config)
    router_cfg = adapter.router_config(model.config)
    moe = _expert_names(model, adapter)
    expert_param_names = {f"{mod}.{p}" for _, mod in moe for p, _ in model.get_submodule(mod).named_parameters()}

    # non-expert tensors: every state_dict entry of the model except the routed experts
    on_disk = {adapter.memory_name(k): k for k in ckpt.entries}
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(model.config, "tie_word_embeddings", False) else set()
    specs = []
    for name, t in model.state_dict().items():
        if name in expert_param_names or (name in tied and name not in on_disk):
            continue
        if name not in on_disk:
            raise PoolError(f"{model_dir}: the model needs tensor {name!r} but no checkpoint key maps to it; "
                            "the checkpoint does not match its config.json")
        e = ckpt.entries[on_disk[name]][1]
        if e.shape != tuple(t.shape):
            raise PoolError(f"{model_dir}: tensor {on_disk[name]!r} has shape {list(e.shape)}, the config implies {list(t.shape)}")
        specs.append((name, e.dtype, e.shape))

    # expert layout of one record, from the first MoE layer's first expert
    layouts = {layer: _expert_reader(ckpt, adapter, layer) for layer, _ in moe}
    sample = layouts[moe[0][0]][1](0)
    params, expert_bytes = record_layout((p, sample[p].dtype, tuple(sample[p].shape)) for p in adapter.fused.params)

    total = len(specs) + len(moe) * num_experts * (1 + len(tiers))
    bar = tqdm(total=total, desc=f"pool build {model_dir.name}", unit="tensor", disable=not progress)
    with _locked(pool_dir, exclusive=True):
        def non_expert_tensors():
            for name, _, _ in specs:
                yield ckpt.read(on_disk[name])
                bar.update(1)

        write_safetensors(pool_dir / NON_EXPERTS, specs, non_expert_tensors(), meta)
        layer_files, data_start, checksums = [], [], []
        for layer, _ in moe:
            kind, read = layouts[layer]
            rel = f"experts/layer_{layer:03d}.safetensors"
            lspecs = [(f"e{e:05d}.{p.name}", dtype_of(p.dtype), p.shape) for e in range(num_experts) for p in params]
            crcs = [0] * num_experts

            def expert_tensors():
                for e in range(num_experts):
                    record = read(e)  # {param: [in-memory per-expert shape]}
                    for p in params:
                        yield record[p.name]
                    bar.update(1)

            def on_record(name: str, data: memoryview) -> None:
                e = int(name[1:6])
                crcs[e] = zlib.crc32(data, crcs[e])

            write_safetensors(pool_dir / rel, lspecs, expert_tensors(), meta, on_record)
            entries, _ = read_header(pool_dir / rel)
            layer_files.append(rel)
            data_start.append(entries[f"e00000.{params[0].name}"].begin)
            checksums.append(tuple(crcs))
        built = {tier: _write_tier(pool_dir, tier, params, layer_files, data_start, num_experts, meta, bar)
                 for tier in tiers}
        bar.close()
        ckpt.close()
        for name in COPIED:
            if (model_dir / name).is_file():
                with replacing(pool_dir / name) as tmp:
                    shutil.copyfile(model_dir / name, tmp)
        files = [NON_EXPERTS, *layer_files, *(f for t in built.values() for f in t.layer_files)]
        manifest = PoolManifest(
            fingerprint=fp, model_type=adapter.model_type, config=config, num_experts=num_experts,
            top_k=router_cfg.top_k, moe_layers=tuple(l for l, _ in moe), experts_module=tuple(m for _, m in moe),
            expert_params=tuple(params), expert_bytes=expert_bytes, layer_files=tuple(layer_files),
            data_start=tuple(data_start), checksums=tuple(checksums), non_expert_file=NON_EXPERTS,
            non_expert_bytes=sum(d.itemsize * _numel(s) for _, d, s in specs),
            file_sizes={f: (pool_dir / f).stat().st_size for f in files},
            source_layout="+".join(sorted({layouts[l][0] for l, _ in moe})), tiers=built,
        )
        write_atomic(pool_dir / MANIFEST, json.dumps(manifest.to_json(), indent=1).encode())
    return manifest


def _write_tier(pool_dir: Path, tier: str, params: tuple[ExpertParam, ...], layer_files: list[str],
                data_start: list[int], num_experts: int, meta: dict, bar) -> Tier:
    """Quantise every expert of the base layer files into the tier's layer files (runtime/quant.py)."""
    record_parts = [(p.name + suffix, dtype, shape) for p in params for suffix, dtype, shape in
                    parts(p.shape, dtype_of(p.dtype), tier)]
    tier_params, tier_bytes = record_layout(record_parts)
    files, starts, checksums, errors = [], [], [], []
    for rel, start in zip(layer_files, data_start):
        out = rel.replace(".safetensors", f".{tier}.safetensors")
        crcs, errs = [0] * num_experts, [0.0] * num_experts
        fd = os.open(pool_dir / rel, os.O_RDONLY)

        def tensors():
            buffers = {p.name: torch.empty(p.shape, dtype=dtype_of(p.dtype)) for p in params}
            for e in range(num_experts):
                pread_into(fd, list(buffers.values()), start + e * sum(p.nbytes for p in params), pool_dir / rel)
                record = encode(buffers, tier)
                errs[e] = relative_error(buffers, record, tier)
                yield from record.values()
                bar.update(1)

        def on_record(name: str, data: memoryview) -> None:
            e = int(name[1:6])
            crcs[e] = zlib.crc32(data, crcs[e])

        try:
            write_safetensors(pool_dir / out, [(f"e{e:05d}.{n}", d, s) for e in range(num_experts) for n, d, s in record_parts],
                              tensors(), meta, on_record)
        finally:
            os.close(fd)
        entries, _ = read_header(pool_dir / out)
        files.append(out)
        starts.append(entries[f"e00000.{tier_params[0].name}"].begin)
        checksums.append(tuple(crcs))
        errors.append(tuple(round(x, 6) for x in errs))
    return Tier(tier_params, tier_bytes, tuple(files), tuple(starts), tuple(checksums), tuple(errors))


# ---------------------------------------------------------------------------------------------
# reading


class Pool:
    """An opened pool: checked manifest and files, one descriptor per layer file, a shared lock.

    The shared lock keeps `domex pool build` from rewriting the pool while it is served.
    Expert reads are `preadv` into caller buffers (no mapping kept alive, so process RSS holds
    only the experts copied out); each expert's crc32 is checked the first time it is read here.
    """

    def __init__(self, pool_dir: str | Path):
        self.dir = Path(pool_dir)
        if not self.dir.is_dir():
            raise PoolError(f"{self.dir}: no such pool folder; build one with `domex pool build MODEL_DIR {self.dir}`")
        self.manifest = m = PoolManifest.from_dir(self.dir)
        self._lock = _locked(self.dir, exclusive=False)
        self._lock.__enter__()
        self.adapter = adapter_for(m.model_type)
        for rel, size in m.file_sizes.items():
            path = self.dir / rel
            if not path.is_file():
                self.close()
                raise PoolError(f"{path}: pool file missing; the pool is incomplete, rebuild it with "
                                f"`domex pool build MODEL_DIR {self.dir}`")
            if path.stat().st_size != size:
                self.close()
                raise PoolError(f"{path}: {path.stat().st_size} bytes, the manifest says {size}; the file is truncated "
                                f"or from another build, rebuild the pool with `domex pool build MODEL_DIR {self.dir}`")
            _, meta = read_header(path)
            if meta.get("domex_fingerprint") != m.fingerprint:
                self.close()
                raise FingerprintMismatch(
                    f"{path}: written for model fingerprint {str(meta.get('domex_fingerprint'))[:12]}..., the manifest is "
                    f"for {m.fingerprint[:12]}...; the pool mixes files of two models, rebuild it with "
                    f"`domex pool build MODEL_DIR {self.dir}`")
        if len(m.checksums) != m.num_layers or any(len(c) != m.num_experts for c in m.checksums):
            self.close()
            raise PoolError(f"{self.dir / MANIFEST}: the checksum table is not {m.num_layers} layers x {m.num_experts} "
                            f"experts; rebuild the pool with `domex pool build MODEL_DIR {self.dir}`")
        self._fds = {m.base_tier: [os.open(self.dir / rel, os.O_RDONLY) for rel in m.layer_files]}
        self._fds.update({name: [os.open(self.dir / rel, os.O_RDONLY) for rel in t.layer_files] for name, t in m.tiers.items()})
        self._verified = {name: [[False] * m.num_experts for _ in m.layer_files] for name in self._fds}  # tier: [L][E]
        self.corrupt: list[str] = []  # experts whose bytes failed their checksum in this process

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def check_fingerprint(self, expected: str, what: str) -> None:
        """Refuse an artefact (a store, a pattern) made for another model than this pool's."""
        if expected != self.fingerprint:
            raise FingerprintMismatch(
                f"{what} was made for model fingerprint {expected[:12]}..., the pool {self.dir} holds "
                f"{self.fingerprint[:12]}...; use the pool built from the same model, or re-register the domains on this one")

    def expert_buffers(self, count: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Empty [count, ...] tensors for every expert parameter, in the pool's dtypes (or `dtype`)."""
        return {p.name: torch.empty((count, *p.shape), dtype=dtype or dtype_of(p.dtype), device=device)
                for p in self.manifest.expert_params}

    def read_into(self, l: int, e: int, buffers: list[torch.Tensor], tier: str | None = None) -> int:
        """Read expert e of MoE layer l into CPU tensors (one per record part, manifest order); returns bytes.

        `tier`: a quantised tier's record (its parts: `tier_buffers`) instead of the base one.
        A crc32 mismatch on the first read of an expert in this process raises PoolError.
        """
        m = self.manifest
        tier = tier or m.base_tier
        files = m.tiers[tier] if tier in m.tiers else m
        path = self.dir / files.layer_files[l]
        pread_into(self._fds[tier][l], buffers, files.data_start[l] + e * files.expert_bytes, path)
        if not self._verified[tier][l][e]:
            crc = 0
            for b in buffers:
                crc = zlib.crc32(_as_bytes(b), crc)
            if crc != files.checksums[l][e]:
                where = f"{path}: MoE layer {l} (decoder layer {m.moe_layers[l]}), expert {e}"
                if where not in self.corrupt:
                    self.corrupt.append(where)
                raise PoolError(f"{where}: checksum {crc:08x} != manifest {files.checksums[l][e]:08x}; the pool file is "
                                f"corrupt, rebuild it with `domex pool build MODEL_DIR {self.dir}`")
            self._verified[tier][l][e] = True
        return files.expert_bytes

    def tier_buffers(self, tier: str, count: int) -> dict[str, torch.Tensor]:
        """Empty CPU [count, ...] tensors for every part of a quantised tier's record."""
        self.manifest.tier_bytes(tier)  # names the tiers the pool has when it lacks this one
        return {p.name: torch.empty((count, *p.shape), dtype=dtype_of(p.dtype)) for p in self.manifest.tiers[tier].expert_params}

    def verify_checksums(self) -> list[str]:
        """Read every expert once and check its crc32; returns the corrupt ones (also kept in `corrupt`)."""
        m = self.manifest
        for tier in self._fds:
            buffers = [t[0] for t in (self.expert_buffers(1) if tier == m.base_tier else self.tier_buffers(tier, 1)).values()]
            for l in range(m.num_layers):
                for e in range(m.num_experts):
                    if not self._verified[tier][l][e]:
                        try:
                            self.read_into(l, e, buffers, tier)
                        except PoolError:
                            pass  # recorded in self.corrupt
        return list(self.corrupt)

    def read_layer(self, l: int, experts: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """The experts of MoE layer l (default: all E, in order) stacked as {param: [n, ...]}: fused parameters."""
        experts = range(self.manifest.num_experts) if experts is None else list(experts)
        out = self.expert_buffers(len(experts))
        for j, e in enumerate(experts):
            self.read_into(l, e, [t[j] for t in out.values()])
        return out

    def read_expert(self, l: int, e: int) -> dict[str, torch.Tensor]:
        """Expert e of MoE layer l as {param: tensor} in the in-memory per-expert shapes (e.g. gate_up_proj [2I, H])."""
        out = {k: v[0] for k, v in self.expert_buffers(1).items()}
        self.read_into(l, e, list(out.values()))
        return out

    def non_expert_state_dict(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.dir / self.manifest.non_expert_file, device=str(device))

    def close(self) -> None:
        for fds in getattr(self, "_fds", {}).values():
            for fd in fds:
                os.close(fd)
        self._fds = {}
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
            self._lock = None

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_pool(pool: "Pool | str | Path") -> Pool:
    return pool if isinstance(pool, Pool) else Pool(pool)


def load_skeleton(pool: Pool, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model with every non-expert weight loaded and the routed expert parameters still on meta.

    Non-persistent buffers (rotary inv_freq) are not in the pool: they are recomputed by building
    their module again on the real device from its config. `dtype` casts the floating parameters
    (compute dtype); buffers keep theirs (inv_freq and correction biases stay fp32).
    """
    model = meta_model(pool.manifest.config)
    model.config.output_router_logits = False  # the training-only aux loss needs all experts and breaks padded batches
    experts = {f"{m}.{p.name}" for m in pool.manifest.experts_module for p in pool.manifest.expert_params}
    missing, unexpected = model.load_state_dict(pool.non_expert_state_dict(device), strict=False, assign=True)
    assert not unexpected, unexpected
    if set(missing) - experts:
        model.tie_weights()  # tied lm_head: the pool stores the embedding once, as the checkpoint did
    for name, module in model.named_modules():
        stale = [b for b, t in module.named_buffers(recurse=False) if t.is_meta]
        if stale:
            if not hasattr(module, "config"):
                raise PoolError(f"module {name} ({type(module).__name__}) has buffers {stale} that are not in the pool "
                                "and cannot be rebuilt from a config; this architecture needs support in runtime/pool.py")
            with torch.device(device):
                fresh = type(module)(module.config)
            for b in stale:
                module._buffers[b] = fresh._buffers[b]
    left = [n for n, p in model.named_parameters() if p.is_meta and n not in experts]
    assert not left, f"parameters not loaded from the pool: {left[:5]}"
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and not p.is_meta:
                p.data = p.data.to(dtype)
        model.config.dtype = dtype
    for module in pool.manifest.experts_module:  # still on meta: give them the pool's dtypes (or the compute dtype)
        experts_module = model.get_submodule(module)
        for p in pool.manifest.expert_params:
            shape = getattr(experts_module, p.name).shape
            meta = torch.empty(shape, dtype=dtype or dtype_of(p.dtype), device="meta")
            setattr(experts_module, p.name, torch.nn.Parameter(meta, requires_grad=False))
    return model.eval()


def load_full_model(pool: "Pool | str | Path") -> torch.nn.Module:
    """The whole transformers model on CPU, every routed expert read from the pool (for the indexer/observer)."""
    owned = not isinstance(pool, Pool)
    pool = open_pool(pool)
    try:
        model = load_skeleton(pool)
        m = pool.manifest
        for l, name in enumerate(m.experts_module):
            experts = model.get_submodule(name)
            for p, t in pool.read_layer(l).items():  # {param: [E, ...]}
                setattr(experts, p, torch.nn.Parameter(t, requires_grad=False))
    finally:
        if owned:
            pool.close()
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(folder: str | Path):
    """The tokenizer saved in a model or pool folder; PoolError saying where it should come from."""
    from transformers import AutoTokenizer

    hint = "save the tokenizer next to the model's config.json (a pool copies it from there when built)"
    if not any((Path(folder) / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from config.json alone, and every text would be 0 tokens
        raise PoolError(f"{folder}: no usable tokenizer (none of {', '.join(TOKENIZER_FILES)}); {hint}")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise PoolError(f"{folder}: no usable tokenizer ({str(e).splitlines()[0][:160]}); {hint}") from None


def build_command(model_dir: str, pool_dir: str, tiers: str = "", quiet: bool = False) -> int:
    """`domex pool build`."""
    m = build(model_dir, pool_dir, tiers=tiers, progress=not quiet)
    gib = (m.non_expert_bytes + m.num_layers * m.num_experts * m.expert_bytes) / 2**30
    print(f"pool {pool_dir}: {m.model_type}, {m.num_layers} MoE layers x {m.num_experts} experts "
          f"({m.expert_bytes / 2**20:.2f} MiB each, from {m.source_layout} keys), {gib:.2f} GiB, "
          f"fingerprint {m.fingerprint[:12]}")
    for name, t in m.tiers.items():
        print(f"  tier {name}: {t.expert_bytes / 2**20:.3f} MiB per expert ({t.expert_bytes / m.expert_bytes:.1%} of {m.base_tier})")
    return 0
