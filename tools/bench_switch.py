"""Benchmark of the expert pool + cache + engine: domain switch, delta loads, decode, memory (DESIGN §8).

    .venv/bin/python tools/bench_switch.py --json out.json [--scratch /work/scratch/bench_switch] [--device cuda]

One run measures, side by side on the same machine:
  memcpy_gbps          torch copy_ of a 256 MiB buffer, 1 thread (the reference rate), median of runs
                       interleaved with the switches below
  delta_load_gbps      bytes / seconds of make_resident over 50%-budget switches A <-> B that share half
                       their experts (warm page cache, checksums already verified in this process)
  switch_ms            Engine.ensure for such a switch (reads only B \\ A), mean
  naive_switch_ms      from_pretrained of the checkpoint, then prune to the mask (what a switch costs without domex)
  decode_tps_runtime   greedy tokens/s of Engine.generate under a 50% mask
  decode_tps_compact   greedy tokens/s of transformers on a compact checkpoint of the same experts
  rss_full_mb / rss_half_mb   process RSS after a forward with all / 50% of experts resident (fresh subprocesses)
  build_peak_rss_mb    peak RSS of `domex pool build` (subprocess) against the largest single tensor
on a synthetic Qwen3-MoE with >= 1 GiB of fp32 experts (written streaming to --scratch, reused across
runs), and the switch/memory figures on the demo model (models/tiny-moe) when it has been trained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from domex.runtime.engine import Engine
from domex.runtime.checkpoint import write_safetensors
from domex.runtime.pool import Pool, PoolManifest, build, load_skeleton
from domex.store.mask import Mask

ROOT = Path(__file__).resolve().parent.parent
SYNTH = dict(hidden_size=1024, moe_intermediate_size=512, num_experts=64, num_experts_per_tok=4, num_hidden_layers=8,
             intermediate_size=2048, vocab_size=8192, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
             max_position_embeddings=512, norm_topk_prob=True, tie_word_embeddings=False)


# ---------------------------------------------------------------------------------------------
# models


def write_synthetic(model_dir: Path) -> None:
    """A random Qwen3-MoE checkpoint in the usual per-expert layout, one shard per decoder layer, streamed."""
    from transformers import Qwen3MoeConfig

    from domex.runtime.families import adapter_for
    from domex.runtime.pool import meta_model

    marker = model_dir / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == SYNTH:
        return
    model_dir.mkdir(parents=True, exist_ok=True)
    config = Qwen3MoeConfig(**SYNTH, dtype="float32")
    config.save_pretrained(model_dir)
    adapter = adapter_for(config)
    model = meta_model(json.loads((model_dir / "config.json").read_text()))
    g = torch.Generator().manual_seed(0)
    shards: dict[str, list] = {}
    for name, t in model.state_dict().items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            if name.endswith("down_proj"):
                continue
            l = int(layer)
            for e in range(config.num_experts):
                h, i = config.hidden_size, config.moe_intermediate_size
                for key, shape in zip(adapter.per_expert.keys(l, e), [(i, h), (i, h), (h, i)]):  # gate, up, down
                    shards.setdefault(layer, []).append((key, torch.float32, shape))
        else:
            shards.setdefault(layer, []).append((name, torch.float32, tuple(t.shape)))

    def produce(specs):
        for name, _, shape in specs:
            if name.endswith("norm.weight"):
                yield torch.ones(shape)
            elif name.endswith("mlp.gate.weight"):
                yield torch.randn(shape, generator=g) * 0.5
            else:
                yield torch.randn(shape, generator=g) * 0.02

    weight_map = {}
    for i, (layer, specs) in enumerate(sorted(shards.items())):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(model_dir / fname, specs, produce(specs), {"format": "pt"})
        weight_map.update({name: fname for name, _, _ in specs})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    marker.write_text(json.dumps(SYNTH))


def ensure_pool(model_dir: Path, pool_dir: Path) -> PoolManifest:
    from domex.runtime.checkpoint import fingerprint

    if (pool_dir / "manifest.json").is_file() and PoolManifest.from_dir(pool_dir).fingerprint == fingerprint(model_dir):
        return PoolManifest.from_dir(pool_dir)
    return build(model_dir, pool_dir, progress=False)


def write_compact(pool_dir: Path, mask: Mask, out: Path) -> None:
    """A compact checkpoint of the mask's experts: runtime/export.py when present, else a minimal one here."""
    try:
        from domex.runtime.export import export

        export(pool_dir, mask, out)
        return
    except ImportError:
        pass
    with Pool(pool_dir) as pool:
        model = load_skeleton(pool)
        k = len(mask.layers[0])
        for l, ((_, block), kept) in enumerate(zip(pool.adapter.moe_blocks(model), mask.layers)):
            bufs = pool.expert_buffers(k)  # {param: [K, ...]}
            for j, e in enumerate(kept):
                pool.read_into(l, e, [b[j] for b in bufs.values()])
            for p, t in bufs.items():
                setattr(block.experts, p, torch.nn.Parameter(t, requires_grad=False))
            router = pool.adapter.router(block)
            router.weight = torch.nn.Parameter(router.weight.data[list(kept)].clone(), requires_grad=False)
            block.experts.num_experts = router.num_experts = k
        setattr(model.config, pool.adapter.count_key, k)
        model.save_pretrained(out)


def masks(manifest: PoolManifest, seed: int = 0) -> tuple[Mask, Mask]:
    """Two 50% masks per layer that share half their experts."""
    rng = random.Random(seed)
    E, half = manifest.num_experts, manifest.num_experts // 2
    a, b = [], []
    for _ in range(manifest.num_layers):
        ids = rng.sample(range(E), E)
        a.append(ids[:half])
        b.append(ids[: half // 2] + ids[half: half + half - half // 2])
    return Mask.of(E, a), Mask.of(E, b)


# ---------------------------------------------------------------------------------------------
# measurements


def memcpy_gbps(nbytes: int = 256 << 20, device: str = "cpu") -> float:
    """The reference rate: a 1-thread host copy on CPU; on CUDA a pinned host -> device copy of the same bytes."""
    if device.startswith("cuda"):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

        def copy():
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize(device)

        copy()
        return nbytes / min(_timed(copy) for _ in range(3)) / 1e9
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(3))
    torch.set_num_threads(threads)
    return nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def switching(pool_dir: Path, rounds: int = 6, device: str = "cpu") -> dict:
    engine = Engine.open(pool_dir, budget="50%", device=device)
    a, b = masks(engine.pool.manifest)
    for m in (a, b, a):  # first reads: page cache warm, checksums verified
        engine.ensure(m)
    times, nbytes, load_s, copy_gbps = [], 0, 0.0, []
    for i in range(rounds):  # memcpy interleaved with the switches: the shared host's load drifts
        copy_gbps.append(memcpy_gbps(device=device))
        m = b if i % 2 == 0 else a
        t = time.perf_counter()
        report = engine.ensure(m)
        times.append(time.perf_counter() - t)
        nbytes += report.bytes_read
        load_s += report.seconds
    out = {"switch_ms": 1e3 * sum(times) / len(times), "delta_load_gbps": nbytes / load_s / 1e9,
           "memcpy_gbps": sorted(copy_gbps)[len(copy_gbps) // 2],
           "switch_experts": report.loaded, "switch_mib": report.bytes_read / 2**20}
    engine.close()
    return out


def naive_switch_ms(model_dir: Path, mask: Mask) -> float:
    """from_pretrained of the whole checkpoint, then keep only the mask's experts (slice experts and router rows)."""
    from transformers import AutoModelForCausalLM

    from domex.runtime.families import adapter_for

    def once():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        adapter = adapter_for(model.config)
        for (_, block), kept in zip(adapter.moe_blocks(model), mask.layers):
            idx = torch.tensor(kept)
            for name, p in list(block.experts.named_parameters()):
                setattr(block.experts, name, torch.nn.Parameter(p.data[idx].clone(), requires_grad=False))
            router = adapter.router(block)
            router.weight = torch.nn.Parameter(router.weight.data[idx].clone(), requires_grad=False)
            block.experts.num_experts = len(kept)
        return model

    return 1e3 * min(_timed(once) for _ in range(2))


def decode(pool_dir: Path, compact_dir: Path, mask: Mask, new_tokens: int = 8, rounds: int = 5, device: str = "cpu") -> dict:
    from transformers import AutoModelForCausalLM

    engine = Engine.open(pool_dir, budget="50%", device=device)
    engine.ensure(mask)
    compact = AutoModelForCausalLM.from_pretrained(compact_dir, dtype=torch.float32).eval().to(device)
    ids = torch.randint(0, engine.model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        diff = (engine.logits(ids) - compact(ids).logits).abs().max().item()
        ours, theirs = [], []
        for _ in range(rounds):  # interleaved, best of each: the host is shared
            ours.append(_timed(lambda: engine.generate(ids, **kw)))
            theirs.append(_timed(lambda: compact.generate(ids, **kw)))
    engine.close()
    return {"decode_tps_runtime": new_tokens / min(ours), "decode_tps_compact": new_tokens / min(theirs),
            "compact_logits_max_abs_diff": diff}


def child_rss(pool_dir: Path, fraction: str) -> dict:
    """Run in a fresh interpreter: open the pool with a budget, make that many experts resident, forward once."""
    code = f"""
import json, psutil, torch
from domex.runtime.engine import Engine
from domex.store.mask import Mask
base = psutil.Process().memory_info().rss
engine = Engine.open({str(pool_dir)!r}, budget={fraction!r})
m = engine.pool.manifest
n = engine.cache.num_slots
mask = Mask.of(m.num_experts, [range(n)] * m.num_layers)
engine.ensure(mask)
engine.logits(torch.randint(0, 100, (1, 16)))
print(json.dumps({{"rss_mb": psutil.Process().memory_info().rss / 2**20, "baseline_mb": base / 2**20,
                  "resident_mb": engine.stats().resident_bytes / 2**20}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_peak(model_dir: Path, scratch: Path) -> dict:
    """Peak RSS of a pool build in a fresh process, against its RSS before building and the largest tensor."""
    code = f"""
import json, shutil, psutil
from domex.runtime.checkpoint import Checkpoint
from domex.runtime.pool import build
import transformers, torch
base = psutil.Process().memory_info().rss
ckpt = Checkpoint({str(model_dir)!r})
largest = max(e.end - e.begin for _, e in ckpt.entries.values())
build({str(model_dir)!r}, {str(scratch / 'build_probe_pool')!r}, progress=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]  # this process's peak (ru_maxrss keeps the forking parent's)
shutil.rmtree({str(scratch / 'build_probe_pool')!r})
print(json.dumps({{"peak_mb": int(hwm.split()[1]) / 1024, "baseline_mb": base / 2**20, "largest_tensor_mb": largest / 2**20}}))
"""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["seconds"] = time.perf_counter() - t
    return res


def model_bytes(manifest: PoolManifest) -> dict:
    experts = manifest.num_layers * manifest.num_experts * manifest.expert_bytes
    return {"expert_mib": experts / 2**20, "non_expert_mib": manifest.non_expert_bytes / 2**20,
            "layers": manifest.num_layers, "experts": manifest.num_experts, "expert_bytes": manifest.expert_bytes}


def measure(model_dir: Path, pool_dir: Path, scratch: Path, *, full: bool, device: str = "cpu") -> dict:
    manifest = ensure_pool(model_dir, pool_dir)
    res = {"model": str(model_dir), "device": device, **model_bytes(manifest), **switching(pool_dir, device=device)}
    a, _ = masks(manifest)
    if full:
        res["naive_switch_ms"] = naive_switch_ms(model_dir, a)
        compact = scratch / f"{pool_dir.name}_compact_{manifest.fingerprint[:12]}"
        if not (compact / "config.json").is_file():
            write_compact(pool_dir, a, compact)
        res.update(decode(pool_dir, compact, a, device=device))
    full_rss, half_rss = child_rss(pool_dir, "100%"), child_rss(pool_dir, "50%")
    res.update(rss_full_mb=full_rss["rss_mb"], rss_half_mb=half_rss["rss_mb"], rss_baseline_mb=full_rss["baseline_mb"])
    return res


def table(res: dict, demo: dict | None) -> str:
    rows = [
        ("pinned host -> device copy" if res["device"].startswith("cuda") else "single-thread memcpy",
         f"{res['memcpy_gbps']:.2f} GB/s", "reference"),
        ("delta load (warm)", f"{res['delta_load_gbps']:.2f} GB/s",
         f"{res['delta_load_gbps'] / res['memcpy_gbps']:.2f}x memcpy (target >= 0.7)"),
        ("domain switch (50%, half shared)", f"{res['switch_ms']:.1f} ms",
         f"{res['switch_experts']} experts, {res['switch_mib']:.0f} MiB"),
        ("naive switch (from_pretrained + prune)", f"{res['naive_switch_ms']:.0f} ms",
         f"{res['naive_switch_ms'] / res['switch_ms']:.0f}x the switch (target >= 20)"),
        ("decode, runtime 50% mask", f"{res['decode_tps_runtime']:.1f} tok/s",
         f"{res['decode_tps_runtime'] / res['decode_tps_compact']:.2f}x compact (target >= 0.95)"),
        ("decode, compact checkpoint", f"{res['decode_tps_compact']:.1f} tok/s", "transformers from_pretrained"),
        ("RSS, all experts resident", f"{res['rss_full_mb']:.0f} MB", f"interpreter + libraries {res['rss_baseline_mb']:.0f} MB"),
        ("RSS, 50% resident", f"{res['rss_half_mb']:.0f} MB", f"{res['rss_half_mb'] / res['rss_full_mb']:.2f}x full (target <= 0.6); "
         f"{_over_base(res):.2f}x over the baseline"),
        ("pool build peak RSS", f"{res['build']['peak_mb']:.0f} MB",
         f"{res['build']['peak_mb'] - res['build']['baseline_mb']:.0f} MB over its start; largest tensor "
         f"{res['build']['largest_tensor_mb']:.0f} MB; {res['build']['seconds']:.0f} s"),
    ]
    if demo:
        rows += [
            ("demo: switch (50%)", f"{demo['switch_ms']:.2f} ms", f"{demo['delta_load_gbps']:.2f} GB/s delta load"),
            ("demo: RSS full / 50%", f"{demo['rss_full_mb']:.0f} / {demo['rss_half_mb']:.0f} MB",
             f"{demo['rss_half_mb'] / demo['rss_full_mb']:.2f}x (baseline {demo['rss_baseline_mb']:.0f} MB)"),
        ]
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    return "\n".join(f"| {a:<{w}} | {b:>{v}} | {c} |" for a, b, c in
                     [("measure", "value", "ratio / note"), ("-" * w, "-" * v, "---")] + rows)


def _over_base(r: dict) -> float:
    return (r["rss_half_mb"] - r["rss_baseline_mb"]) / (r["rss_full_mb"] - r["rss_baseline_mb"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--scratch", type=Path, default=Path("/work/scratch/bench_switch"))
    parser.add_argument("--demo", type=Path, default=ROOT / "models" / "tiny-moe")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for decode (the copies use 1)")
    parser.add_argument("--device", default="cpu", help="cuda: delta loads into GPU slots through pinned staging, "
                        "against a pinned host -> device copy of the same size; decode on the GPU")
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    args.scratch.mkdir(parents=True, exist_ok=True)
    synth = args.scratch / "synthetic"
    t = time.perf_counter()
    write_synthetic(synth)
    res = {"machine": f"{platform.node()}: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
                      f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, torch {torch.__version__}, "
                      f"{args.threads} torch threads"}
    res.update(measure(synth, args.scratch / "synthetic_pool", args.scratch, full=True, device=args.device))
    res["build"] = build_peak(synth, args.scratch)
    demo = None
    if (args.demo / "config.json").is_file() and list(args.demo.glob("*.safetensors")):
        demo = measure(args.demo, args.scratch / "demo_pool", args.scratch, full=False, device=args.device)
        res["demo"] = demo
    else:
        res["demo"] = f"absent: {args.demo} has no trained checkpoint yet"
    res["seconds"] = time.perf_counter() - t
    print(res["machine"])
    print(table(res, demo))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
