"""Benchmark of registration (DESIGN §8 "registration"): time, observer overhead, streaming memory.

    .venv/bin/python tools/bench_index.py --json out.json [--domain sql] [--scratch /work/scratch/bench_index]

Measured side by side in one run:
  register_s          register() of 8 demos (patterns/<domain>.jsonl) on the demo model's pool, in a process that
                      has registered once before (imports and the embedder loaded, as in a server), best of 3;
                      target <= 3 s
  register_cold_s     the same as a fresh `domex register` subprocess (Python start, imports, embedder load)
  observer_overhead   forward time over the 8 demos with the observer attached / without it (best of 7 each,
                      interleaved); target <= 1.5
  rss_full_mb         peak RSS of a subprocess observing 8 sequences on a synthetic >= 1 GB model in full mode
  rss_stream_mb       the same in streaming mode (one MoE layer's experts resident at a time)
The demo model is models/tiny-moe once trained; until then a random model of the same shape with the
demo tokenizer stands in (said in the output). The synthetic model is tools/bench_switch.py's (reused
from its scratch folder when built there, else written to --scratch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "tiny-moe"
SWITCH_SCRATCH = Path("/work/scratch/bench_switch")
FALLBACK_DEMOS = [{"prompt": f"Question {i}: what does SELECT {i} return?", "response": f"It returns the number {i}."}
                  for i in range(8)]


def has_weights(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def fallback_model(out: Path) -> Path:
    """A random Qwen3-MoE shaped like the demo model (tools/train_demo_model.py), with the demo tokenizer, in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    if has_weights(out):
        return out
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, moe_intermediate_size=128, intermediate_size=512,
                         num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def ensure_pool(model_dir: Path, pool_dir: Path) -> Path:
    from domex.runtime.checkpoint import fingerprint
    from domex.runtime.pool import PoolManifest, build

    if not ((pool_dir / "manifest.json").is_file() and PoolManifest.from_dir(pool_dir).fingerprint == fingerprint(model_dir)):
        build(model_dir, pool_dir, progress=False)
    return pool_dir


def demo_file(domain: str, scratch: Path) -> tuple[Path, str]:
    """The first 8 demos of patterns/<domain>.jsonl, or 8 built-in ones when the pack is missing."""
    src = ROOT / "patterns" / f"{domain}.jsonl"
    out = scratch / f"{domain}.8.jsonl"
    if src.is_file():
        lines = [l for l in src.read_text().splitlines() if l.strip()][:8]
        note = str(src.relative_to(ROOT))
    else:
        lines = [json.dumps(d) for d in FALLBACK_DEMOS]
        note = f"built-in demos (no {src.relative_to(ROOT)})"
    out.write_text("\n".join(lines) + "\n")
    return out, note


def time_register(pool: Path, demos: Path, repeats: int = 3) -> float:
    """Best of `repeats` registrations into fresh stores, after one warm-up (imports, embedder, page cache).

    Best, not mean: on a shared machine the minimum is the closest to what the code costs.
    """
    from domex.runtime.indexer import register

    with tempfile.TemporaryDirectory() as tmp:
        register(pool, Path(tmp) / "warm", "warmup", demos, progress=False)
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            register(pool, Path(tmp) / f"store{i}", "bench", demos, progress=False)
            times.append(time.perf_counter() - t)
        return min(times)


def time_register_cold(pool: Path, demos: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "domex.runtime.cli", "register", "--pool", str(pool), "--store", f"{tmp}/s",
               "--domain", "bench", str(demos)]
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        return time.perf_counter() - t


@torch.no_grad()
def observer_overhead(pool: Path, demos: Path, repeats: int = 7) -> tuple[float, float, float]:
    """(plain seconds, observed seconds, ratio): best of `repeats` passes over the 8 demos, interleaved."""
    from domex.runtime.indexer import context_length, from_pool, tokenize
    from domex.runtime.observer import Observer
    from domex.store.demos import read_demos

    subject = from_pool(pool)
    model = subject.load_model()
    seqs = [s.reshape(1, -1) for s in tokenize(subject.tokenizer, read_demos(demos), context_length(subject.config, None))]

    def run() -> float:
        t = time.perf_counter()
        for ids in seqs:
            model.base_model(input_ids=ids, use_cache=False)
        return time.perf_counter() - t

    run()  # warm-up
    plain, observed = [], []
    for _ in range(repeats):  # interleaved, so load from other processes hits both alike
        plain.append(run())
        with Observer(model):
            observed.append(run())
    p, o = min(plain), min(observed)
    return p, o, o / p


RSS_CHILD = """
import resource, sys, time, torch
from domex.runtime.observer import observe, observe_streaming
from domex.runtime.pool import Pool, load_full_model
from domex.runtime.indexer import pool_source
pool = Pool(sys.argv[1])
g = torch.Generator().manual_seed(0)
seqs = [torch.randint(0, pool.manifest.config["vocab_size"], (128,), generator=g) for _ in range(8)]
t = time.perf_counter()
if sys.argv[2] == "full":
    stats = observe(load_full_model(pool), seqs)
else:
    stats = observe_streaming(pool_source(pool), seqs)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, time.perf_counter() - t, float(stats.easyep_sum.sum()))
"""


def synthetic_pool(scratch: Path) -> Path:
    """The >= 1 GB synthetic Qwen3-MoE pool of tools/bench_switch.py, reused when it is there."""
    shared = SWITCH_SCRATCH / "synthetic_pool"
    if (shared / "manifest.json").is_file():
        return shared
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_switch import write_synthetic

    write_synthetic(scratch / "synthetic")
    return ensure_pool(scratch / "synthetic", scratch / "synthetic_pool")


def peak_rss(pool: Path, mode: str) -> tuple[float, float, float]:
    """(peak RSS MB, seconds, easyep total) of a fresh subprocess observing in `mode`."""
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(pool), mode], check=True, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    rss, secs, total = out.stdout.split()[-3:]
    return float(rss), float(secs), float(total)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--domain", default="sql", help="demo pack under patterns/ (default sql)")
    parser.add_argument("--scratch", type=Path, default=Path("/work/scratch/bench_index"))
    parser.add_argument("--skip-rss", action="store_true", help="skip the synthetic-model memory runs")
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    if has_weights(DEMO_MODEL):
        model_dir, model_note = DEMO_MODEL, "models/tiny-moe"
    else:
        model_dir = fallback_model(args.scratch / "fallback_model")
        model_note = "random stand-in of the demo model's shape (models/tiny-moe not trained yet)"
    pool = ensure_pool(model_dir, args.scratch / f"{model_dir.name}_pool")
    demos, demo_note = demo_file(args.domain, args.scratch)

    res: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                            f"{torch.get_num_threads()} threads", "model": model_note, "demos": demo_note}
    res["load_before"] = os.getloadavg()[0]
    res["register_s"] = time_register(pool, demos)
    res["register_cold_s"] = time_register_cold(pool, demos)
    res["plain_forward_s"], res["observed_forward_s"], res["observer_overhead"] = observer_overhead(pool, demos)
    if not args.skip_rss:
        synth = synthetic_pool(args.scratch)
        from domex.runtime.pool import PoolManifest

        m = PoolManifest.from_dir(synth)
        res["synthetic"] = f"{synth} ({m.num_layers} MoE layers x {m.num_experts} experts, " \
                           f"{m.num_layers * m.num_experts * m.expert_bytes / 1e9:.2f} GB experts)"
        res["rss_full_mb"], res["full_s"], full_total = peak_rss(synth, "full")
        res["rss_stream_mb"], res["stream_s"], stream_total = peak_rss(synth, "stream")
        res["rss_ratio"] = res["rss_stream_mb"] / res["rss_full_mb"]
        res["stream_equals_full"] = abs(full_total - stream_total) <= 1e-6 * max(1.0, abs(full_total))

    res["load_after"] = os.getloadavg()[0]
    rows = [("register 8 demos, warm process (s)", "register_s", "<= 3"),
            ("register 8 demos, fresh `domex register` (s)", "register_cold_s", ""),
            ("observer forward / plain forward", "observer_overhead", "<= 1.5"),
            ("peak RSS, full mode, synthetic model (MB)", "rss_full_mb", ""),
            ("peak RSS, streaming mode, synthetic model (MB)", "rss_stream_mb", "< full"),
            ("streaming / full RSS", "rss_ratio", "")]
    print(f"machine: {res['machine']}, 1-min load average {res['load_before']:.1f} before, {res['load_after']:.1f} after"
          f"\nmodel: {res['model']}\ndemos: {res['demos']}")
    if "synthetic" in res:
        print(f"synthetic: {res['synthetic']}; streaming scores equal full: {res['stream_equals_full']}")
    print(f"| {'what':<48} | {'value':>9} | target |\n|{'-' * 50}|{'-' * 11}|--------|")
    for label, key, target in rows:
        if key in res:
            print(f"| {label:<48} | {res[key]:>9.3f} | {target:<6} |")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
