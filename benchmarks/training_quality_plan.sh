#!/usr/bin/env bash
# The training study's queue, most needed first: each line is one stage of benchmarks/training_quality.py
# (2 workers, one thread each). Runs already saved are skipped, so rerunning this script resumes the study
# where it stopped; `python benchmarks/training_quality.py --report` rebuilds the tables from whatever finished.
#   bash benchmarks/training_quality_plan.sh            # from the repository root, in its own venv
# A run in progress saves its state every 10 minutes beside its result, as <result>.partial.pt; git ignores
# these files, so a machine that is not kept loses them. To carry a run over to another machine, commit its
# save (`git add -f benchmarks/training_quality/<task>/<run>.partial.pt`) and remove it from git once the
# run's result is saved: the run continues from the save wherever the study is started again.
set -u
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
TQ="python benchmarks/training_quality.py --no-write --workers ${WORKERS:-2}"
FF10="lr 0.3, damping 0.0001"   # the 10-bit flip-flop's best swept SOFO setting (1,000-iteration sweep)
# 1. context-dependent integration, where SOFO may win: sweep, each method's best and SOFO's options on 3 seeds, HF's damping
$TQ --tasks context_integration --stage sweep
$TQ --tasks context_integration --stage seeds --iterations 2000 --options "memory 2" "gradient tangent" "unit-norm tangents"
$TQ --tasks context_integration --stage hf-sweep
# Adam for 4x the iterations (more wall-clock than SOFO's 2,000): does it catch up given the time?
$TQ --tasks context_integration --stage labels --seeds 0 1 2 --iterations 8000 --labels "Adam:lr 0.01, clip 1" "Adam:lr 0.003, clip 1"
# 2. the 10-bit flip-flop, where SOFO loses: gradient-informed and the authors' unit-norm tangents on 3 seeds; HF
$TQ --tasks flipflop10 --stage labels --seeds 0 1 2 --iterations 2000 --labels "SOFO:$FF10 + gradient tangent" "SOFO:$FF10 + unit-norm tangents"
# 3. neighbours of context integration: 4 contexts (the base task's best settings), and a choice read out at
#    the end (its own sweep: the base task's adaptive lr 0.5 stayed at chance there), with HF's full-space step
$TQ --tasks context_integration_4 --stage labels --seeds 0 1 2 --iterations 2000 \
    --labels "SOFO:lr 0.5, adaptive" "Adam:lr 0.01, clip 1" "Adam:lr 0.003, clip 1" "SOFO:lr 0.5, adaptive + gradient tangent"
$TQ --tasks context_decision --stage labels --seeds 0 --iterations 2000 --labels "SOFO:lr 0.5, adaptive" "Adam:lr 0.01, clip 1" "Adam:lr 0.003, clip 1"
$TQ --tasks context_decision --stage sweep
$TQ --tasks context_decision --stage seeds --iterations 2000 --options "gradient tangent"
$TQ --tasks context_decision --stage labels --seeds 0 --iterations 300 --labels "HF:damping 0.1"
# 4. where SOFO's compute goes: K x B splits at the task's own K x B, 3 seeds (the configs' defaults follow them)
$TQ --tasks double_reach --stage splits --seeds 0 1 2 --iterations 2000
# the 10-bit flip-flop's more-tangents splits first (seed 0: K 256 x B 8 ended 5x below the config's K 64 x B 32)
$TQ --tasks flipflop10 --stage labels --seeds 1 2 --iterations 2000 \
    --labels "SOFO:$FF10 + K 256 x B 8" "SOFO:$FF10 + K 128 x B 16"
$TQ --tasks flipflop10 kalman --stage splits --seeds 0 1 2 --iterations 2000
# 5. the full-space ceiling where SOFO loses (HF steps cost 10-30 SOFO steps: fewer iterations, stated in the tables)
$TQ --tasks flipflop10 --stage labels --seeds 0 --iterations 300 --labels "HF:damping 0.1"
# 6. gradient tangents where SOFO loses at the authors' batch and network size (about 20 min per run on one
#    thread), each on the task's best SOFO setting
KN100="lr 0.3, damping 0.0001"   # kalman_n100's best SOFO setting (seed 0 at 2,000 iterations)
$TQ --tasks double_reach_b256 --stage labels --seeds 0 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + gradient tangent"
$TQ --tasks kalman_n100 --stage labels --seeds 0 --iterations 2000 --labels "SOFO:$KN100 + gradient tangent"
# 7. a longer memory: T = 300
$TQ --tasks context_integration_long --stage labels --seeds 0 1 2 --iterations 2000 \
    --labels "SOFO:lr 0.5, adaptive" "Adam:lr 0.01, clip 1" "Adam:lr 0.003, clip 1"
# 8. HF where it is dearest (double_reach_b256: about 90 s per HF iteration, 2.5 h per run, so seed 0 only),
#    and the remaining seeds
$TQ --tasks kalman_n100 double_reach_b256 --stage labels --seeds 0 --iterations 100 --labels "HF:damping 0.1"
$TQ --tasks double_reach_b256 --stage labels --seeds 1 2 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + gradient tangent"
$TQ --tasks kalman_n100 --stage labels --seeds 1 2 --iterations 2000 --labels "SOFO:$KN100 + gradient tangent"
# 9. the authors' Kalman network on every seed, and where its compute and the B = 256 arm's should go
$TQ --tasks kalman_n100 --stage labels --seeds 1 2 --iterations 2000 --labels "SOFO:$KN100" "Adam:lr 0.01, clip 1"
# the arm at B = 256: HF says its subspace falls short, and the B = 16 arm broke below 16 trials, so the
# splits with more tangents and at least 32 trials on seed 0 first, then the best of them on seeds 1 and 2
$TQ --tasks double_reach_b256 --stage labels --seeds 0 --iterations 2000 \
    --labels "SOFO:lr 0.5, adaptive + K 64 x B 128" "SOFO:lr 0.5, adaptive + K 128 x B 64" "SOFO:lr 0.5, adaptive + K 256 x B 32"
$TQ --tasks double_reach_b256 --stage labels --seeds 1 2 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + K 64 x B 128"
# the splits' cost per iteration, measured side by side (their runs' own seconds were taken beside different jobs)
$TQ --tasks double_reach_b256 --stage step-times
# per second against Adam: clipped Adam given about the seconds of SOFO's 2,000 iterations at K 64 x B 128 (about 35 min each)
$TQ --tasks double_reach_b256 --stage labels --seeds 0 1 2 --iterations 8000 --labels "Adam:lr 0.003, clip 1"
$TQ --tasks kalman_n100 --stage labels --seeds 0 1 2 --iterations 2000 --labels "SOFO:$KN100 + K 32 x B 32"
$TQ --tasks kalman_n100 --stage labels --seeds 1 2 --iterations 100 --labels "HF:damping 0.1"
# where SOFO wins: does its compute go better to tangents or trials there too (the main job's config
# follows the winner), and HF's seeds 1 and 2 on the choice read out at the end (5 min each)
$TQ --tasks context_integration --stage splits --seeds 0 1 2 --iterations 2000
$TQ --tasks context_decision --stage labels --seeds 1 2 --iterations 300 --labels "HF:damping 0.1"
# the authors' arm used K = 256: more tangents at B = 256 (4x an iteration's compute; HF's early iterations
# are 2x below SOFO's and Adam's at 100, so the subspace is the suspect)
$TQ --tasks double_reach_b256 --stage labels --seeds 0 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + K 128"
# 10. the 10-bit flip-flop at the SOFO authors' size (hours per SOFO run: each run saves its progress
#     every 10 minutes and continues from it, so this stage spans sessions)
$TQ --tasks flipflop10_authors --stage labels --seeds 0 --iterations 5000 --labels "SOFO:lr 0.3, damping 0.0001" \
    "Adam:lr 0.01, clip 1" "Adam:lr 0.003, clip 1" "Adam:lr 0.0001" "SOFO:lr 0.3, damping 1e-05"
# Adam's runs there take minutes: its best two on every seed
$TQ --tasks flipflop10_authors --stage labels --seeds 1 2 --iterations 5000 --labels "Adam:lr 0.01, clip 1" "Adam:lr 0.003, clip 1"
# 11. what each task still lacks of the study's five methods (plain and gradient-informed SOFO, the best
#     split, HF, clipped Adam) and the authors' unit-norm tangents, and the splits' remaining seeds
$TQ --tasks flipflop10 --stage labels --seeds 1 2 --iterations 2000 --labels "SOFO:$FF10 + K 16 x B 128" "SOFO:$FF10 + K 32 x B 64"
$TQ --tasks double_reach_b256 --stage labels --seeds 1 2 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + K 128 x B 64"
# K 256 x B 32 diverged on seed 0 (the B = 256 arm), but K 128 x B 64 ended at half of Adam on seed 1 after 543 steps
# taken back on seed 0: the seeds differ, so every split gets its 3
$TQ --tasks double_reach_b256 --stage labels --seeds 0 1 2 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + K 256 x B 32"
$TQ --tasks double_reach_b256 --stage step-times
# the neighbours of context integration at the base task's best split (K 256 x B 16), with unit-norm tangents
$TQ --tasks context_integration_4 context_integration_long --stage labels --seeds 0 1 2 --iterations 2000 \
    --labels "SOFO:lr 0.5, adaptive + K 256 x B 16" "SOFO:lr 0.5, adaptive + unit-norm tangents"
$TQ --tasks context_decision --stage labels --seeds 0 1 2 --iterations 2000 \
    --labels "SOFO:lr 0.1, damping 0.001 + K 256 x B 16" "SOFO:lr 0.1, damping 0.001 + unit-norm tangents"
$TQ --tasks context_integration_long --stage labels --seeds 0 1 2 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + gradient tangent"
$TQ --tasks context_integration_4 context_integration_long --stage labels --seeds 0 1 2 --iterations 300 --labels "HF:damping 0.1"
$TQ --tasks flipflop10 --stage labels --seeds 1 2 --iterations 2000 --labels "SOFO:$FF10 + K 128"
$TQ --tasks kalman_n100 --stage labels --seeds 0 1 2 --iterations 2000 --labels "SOFO:$KN100 + unit-norm tangents"
$TQ --tasks double_reach_b256 --stage labels --seeds 0 1 2 --iterations 2000 --labels "SOFO:lr 0.5, adaptive + unit-norm tangents"
echo "training study plan: done"
