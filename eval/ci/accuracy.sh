#!/usr/bin/env bash
# The accuracy regression job (eval/README.md, "CI job"):
#   accuracy.sh baseline BASELINE.json   sweep the settings of settings.env, write the baseline
#   accuracy.sh check BASELINE.json      sweep the same settings, judge them against it
# It exits with `vllm-sparsity eval`'s status (0 ok, 1 regressed, 2 usage, 3 not comparable:
# rebuild the baseline, 4 server or scoring failed, 5 bug: eval/errors.py).
# Environment: EVAL_MODEL (default: the demo model), EVAL_RUNS (sweep folders, default runs/),
# EVAL_URL and EVAL_API_KEY (attach to a running server instead of starting one), and the
# settings of settings.env.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=settings.env
. "$here/settings.env"
mode="${1:?usage: accuracy.sh baseline|check BASELINE.json}"
baseline="${2:?usage: accuracy.sh baseline|check BASELINE.json}"
case "$mode" in
    baseline|check) ;;
    *) echo "accuracy.sh: unknown mode '$mode': baseline or check" >&2; exit 2 ;;
esac
runs="${EVAL_RUNS:-runs}"
model="${EVAL_MODEL:-$(vllm-sparsity demo-model)}"
if [[ -n "${EVAL_URL:-}" ]]; then
    server=(--url "$EVAL_URL" --api-key "${EVAL_API_KEY:-}")  # computes in its own dtype
else
    server=(--dtype "$EVAL_DTYPE")
fi
out="$runs/$mode"
vllm-sparsity eval sweep --model "$model" "${server[@]}" --tasks "$EVAL_TASKS" \
    --limit "$EVAL_LIMIT" --p-grid "$EVAL_GRID" --target "$EVAL_TARGET" --out "$out"
if [[ "$mode" == baseline ]]; then
    mkdir -p "$(dirname "$baseline")"
    commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    vllm-sparsity eval baseline --results "$out/results.json" --deployed-p "$EVAL_DEPLOYED_P" \
        --source "eval/ci/accuracy.sh baseline at commit $commit" --out "$baseline"
else
    # shellcheck disable=SC2086  # EVAL_CHECK_ARGS holds several flags
    vllm-sparsity eval check --results "$out/results.json" --baseline "$baseline" \
        --deployed-p "$EVAL_DEPLOYED_P" $EVAL_CHECK_ARGS
fi
