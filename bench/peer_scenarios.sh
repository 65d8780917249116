#!/usr/bin/env bash
# Issue 17, points 1 and 2: bench/peer_small_text.py on every scenario of
# bench/simulate_scenarios.sh, with the same data, sizes and paired seeds, and the head-only
# replay (--replay). One process (WORKERS, default 1): the machine is shared.
#
#   bench/peer_scenarios.sh [scenario ...]      (default: all eight, in this order)
#
# Learners: our default (margin with the retrain's head; on two classes and on multi-label
# controls it ranks as least confidence does, so those scenarios name it least_confidence, as
# in the runs measured before margin became the default; since margin serves a diverse batch
# by default, `ours:margin` differs from it there, BENCHMARKS.md "A diverse batch") first,
# as the reference of the paired differences; our other uncertainty orderings where they differ from it; the head before issue 17 (MLP)
# in the three scenarios measured before; the multi-label thresholds before issue 17;
# small-text's LeastConfidence, BreakingTies (multi-class only: on two classes it is
# LeastConfidence), and its embedding strategy EmbeddingKMeans on the vectors; on the
# multi-label control its CategoryVectorInconsistencyAndRanking. Not GreedyCoreset: small-text
# recomputes every pool-to-labeled distance for each pick (50 per batch), minutes per run on
# this machine, so it would take the time of all other learners together
# (`--learners ...,smalltext:GreedyCoreset` runs it).
# two_controls: ours and the replay only (small-text's learner answers one question).
# many_class (not in the default list, like in the simulator): our three uncertainty orderings
# and small-text's LeastConfidence and BreakingTies.
# Environment: SEEDS (20), WORKERS (1), PY (.venv/bin/python), RESUME=1 (keep finished runs),
# LEARNERS (replaces every scenario's learners above, e.g. for a shorter run; the first `ours:`
# learner is the replay's), REPLAY_HEADS (our head variants also replayed, `--replay-heads`),
# REPLAY=0 (no head-only replay: for comparing orderings, in less time), OUT_SUFFIX (appended
# to the output folder's name, so that a second comparison keeps the first).
# Writes bench/results/peer/<scenario><OUT_SUFFIX>/{runs.jsonl,summary.json,stdout.txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/scenarios.sh  # scenario_args: the simulator scenarios' data and sizes

PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-20}
WORKERS=${WORKERS:-1}
export HF_HUB_OFFLINE=1
common=(--seeds "$SEEDS" --workers "$WORKERS")
if [[ "${REPLAY:-1}" == 1 ]]; then common+=(--replay); fi
if [[ "${RESUME:-0}" == 1 ]]; then common+=(--resume); fi
if [[ -n "${REPLAY_HEADS:-}" ]]; then common+=(--replay-heads "$REPLAY_HEADS"); fi
multi_class=ours:margin,ours:least_confidence,ours:entropy,ours:least_confidence:mlp,smalltext:LeastConfidence,smalltext:BreakingTies,smalltext:EmbeddingKMeans
# Two classes: fewer learners, for time (EmbeddingKMeans was far behind on three classes).
two_class=ours:least_confidence,ours:least_confidence:mlp,smalltext:LeastConfidence
two_class_short=ours:least_confidence,smalltext:LeastConfidence
images=ours:margin,ours:least_confidence,smalltext:LeastConfidence,smalltext:BreakingTies
# many_class (issue 17, point 3: margin on many-class text): the uncertainty orderings on both
# sides, without the old head and EmbeddingKMeans (for time; neither is the question there).
many_class=ours:margin,ours:least_confidence,ours:entropy,smalltext:LeastConfidence,smalltext:BreakingTies
# The multi-label thresholds before issue 17 (F1 per choice) beside the default (accuracy).
old_thresholds=ours:least_confidence:threshold_objective=f1

run() {
    local scenario=$1; shift
    local out=bench/results/peer/$scenario${OUT_SUFFIX:-}
    mkdir -p "$out"
    echo "== $scenario: $(date -u +%H:%M:%S) $PY bench/peer_small_text.py ${common[*]} $*"
    local started=$SECONDS
    "$PY" bench/peer_small_text.py "${common[@]}" "$@" --out "$out" | tee "$out/stdout.txt" | grep -v '^\['
    echo "== $scenario: $((SECONDS - started)) s"
}

scenarios=("$@")
if [[ ${#scenarios[@]} -eq 0 ]]; then
    scenarios=(in_domain_three_class in_domain_binary domain_shift rare_minority domain_shift_reverse fashion_mnist
               multi_label two_controls)
fi
for scenario in "${scenarios[@]}"; do
    scenario_args "$scenario" || exit 2
    # The simulator's data and sizes; the report points and the learners are the peer's own
    # (a later --report-at overrides the scenario's).
    case $scenario in
        in_domain_binary | domain_shift) extra=(--report-at 100,200,500 --learners "$two_class") ;;
        in_domain_three_class)           extra=(--report-at 100,200,500 --learners "$multi_class") ;;
        domain_shift_reverse | rare_minority) extra=(--report-at 100,200,500 --learners "$two_class_short") ;;
        fashion_mnist)                   extra=(--report-at 40,60,100 --learners "$images") ;;
        many_class)                      extra=(--report-at 100,200,300,500 --learners "$many_class") ;;
        multi_label) extra=(--learners "ours:least_confidence,$old_thresholds,smalltext:LeastConfidence,smalltext:CategoryVectorInconsistencyAndRanking") ;;
        two_controls) extra=(--learners "ours:margin,ours:least_confidence,$old_thresholds") ;;
        # Point 6's 500-label versions: ours only unless LEARNERS says more.
        multi_label_500 | two_controls_500 | fashion_mnist_500) extra=(--learners "ours:margin") ;;
        *) echo "no peer learners for scenario $scenario" >&2; exit 2 ;;
    esac
    if [[ -n "${LEARNERS:-}" ]]; then  # LEARNERS replaces the scenario's own learners
        for i in "${!extra[@]}"; do
            if [[ ${extra[$i]} == --learners ]]; then extra[i + 1]=$LEARNERS; fi
        done
    fi
    run "$scenario" "${SCENARIO_ARGS[@]}" "${extra[@]}"
done
