#!/usr/bin/env bash
# Everything the GPU issue measures, in one run of under ~10 minutes on one H100/H200
# (issue 20): the attention kernels at XL/2 and a long video shape, the XL/2 train step with the
# probed batch and the ablation of each lever, and bf16 against fp8 over 500 steps at B/2; then the
# docs' performance page generated from the JSON. Run from the repository root:
#
#   bash platform/ditforge/bench/gpu_run.sh            # on the GPU machine
#   bash platform/ditforge/bench/gpu_run.sh --quick    # CPU smoke run of the same script (CI-sized)
#
# Writes docs/bench/<date>-<device>.json (commit it) and docs/performance.md. The JSON is written
# after each section, so a run cut short by its time limit keeps what it measured. Needs torch and
# deepspeed (and torchao for fp8) importable by $PYTHON; `pip install -e '.[fp8]'` provides them.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}"
QUICK=()
[[ "${1:-}" == "--quick" ]] && QUICK=(--quick)
LIMIT_S=${LIMIT_S:-540}  # leaves a minute of a 10-minute device call for the page and the copy back

"$PYTHON" -c "import torch, deepspeed" 2>/dev/null || {
  echo "error: $PYTHON cannot import torch and deepspeed (pip install -e '.[fp8]' first)" >&2; exit 2; }
DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
  | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9' '-' | sed 's/-$//')
OUT=${OUT_JSON:-docs/bench/$(date -u +%Y-%m-%d)-$DEVICE${QUICK:+-quick}.json}
PAGE=${OUT_PAGE:-docs/performance.md}
mkdir -p "$(dirname "$OUT")"
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu',
'| torch', torch.__version__)"

# --focus: the headline rows only (bench/train.py `plan`); the attention section first, it is quick.
status=0
timeout --signal=INT --kill-after=30 "$LIMIT_S" "$PYTHON" -m ditforge.cli bench --focus "${QUICK[@]}" \
  --section attention --section train --json "$OUT" || status=$?
[[ -s "$OUT" ]] || { echo "error: the bench wrote no $OUT (exit $status)" >&2; exit 1; }
"$PYTHON" -m ditforge.bench.report "$OUT" --out "$PAGE"
echo "bench exit $status; results in $OUT, page $PAGE"
exit $status
