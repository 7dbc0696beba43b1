#!/usr/bin/env bash
# On a machine with a CUDA GPU, in one go (about 10 minutes at most), writes one JSON summary:
#   1. the test suite with DOMEX_DEVICE=cuda (the tests that take a device put the engine on the GPU;
#      tests/test_cuda.py checks the pinned staging and fence path);
#   2. tools/bench_switch.py --device cuda: delta loads into GPU slots (GB/s) against a pinned host ->
#      device copy of the same bytes measured in the same run, and greedy decode on the GPU against a
#      compact checkpoint of the same experts (tokens/s, max logit difference).
# Usage: tools/accelerator_check.sh [summary.json]   (default accelerator_check.json; logs beside it)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-accelerator_check.json}")
LOGS="${OUT%.json}"
export DOMEX_DEVICE=cuda HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
make setup > "$LOGS.setup.log" 2>&1 || { echo "make setup failed: $LOGS.setup.log"; exit 1; }
PY=.venv/bin/python
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA GPU visible to torch"; exit 1; }

start=$(date +%s)
timeout 360 $PY -m pytest -q -p no:cacheprovider tests --ignore=tests/test_ray_app.py > "$LOGS.tests.log" 2>&1
tests_rc=$?
timeout 180 $PY tools/bench_switch.py --device cuda --scratch "${TMPDIR:-/tmp}/domex_bench_switch" \
    --json "$LOGS.bench_switch.json" > "$LOGS.bench_switch.log" 2>&1
bench_rc=$?

$PY - "$OUT" "$LOGS" "$tests_rc" "$bench_rc" "$start" <<'PYEOF'
import json, sys, time, torch
out, logs, tests_rc, bench_rc, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
tail = open(f"{logs}.tests.log").read().strip().splitlines()[-1:]
try:
    bench = json.load(open(f"{logs}.bench_switch.json"))
except (OSError, ValueError):
    bench = None
summary = {
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
    "tests": {"exit_code": tests_rc, "summary": tail[0] if tail else "", "log": f"{logs}.tests.log"},
    "bench_switch": {"exit_code": bench_rc, "log": f"{logs}.bench_switch.log"},
    "seconds": round(time.time() - start),
}
if bench:
    summary["bench_switch"].update({k: bench.get(k) for k in (
        "memcpy_gbps", "delta_load_gbps", "switch_ms", "decode_tps_runtime", "decode_tps_compact",
        "compact_logits_max_abs_diff")})
    if bench.get("memcpy_gbps"):
        summary["bench_switch"]["delta_load_vs_pinned_copy"] = bench["delta_load_gbps"] / bench["memcpy_gbps"]
json.dump(summary, open(out, "w"), indent=1)
print(json.dumps(summary, indent=1))
PYEOF
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
