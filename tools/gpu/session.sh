#!/usr/bin/env bash
# Run THERE (the remote GPU job), from the repo root, as the job's command, after
# tools/gpu/prepare.sh here and with the extra paths it prints (".gpudata", ".whl", and
# generator 0 when it is finished here). tools/gpu/README.md describes the three steps.
#
#   bash tools/gpu/session.sh checks        # CUDA tests + training and generator benchmarks
#   bash tools/gpu/session.sh grid MINUTES  # the thesis grid for MINUTES (TRAIN_GEN=1:
#                                           # its five generators first)
#   bash tools/gpu/session.sh all MINUTES   # one job's worth: CUDA tests, benchmarks
#                                           # (ResNet-18, ViT), then the grid
#   bash tools/gpu/session.sh quality MINUTES  # generator 0 (#4) and its unguided and
#                                           # guided strength sweeps
#   bash tools/gpu/session.sh chapters MINUTES # with generator 0 carried in: its guidance
#                                           # sweep, notebooks 02-03's figures, synth bench
#   bash tools/gpu/session.sh levers MINUTES   # the generator's speed levers beside its default
#   bash tools/gpu/session.sh genquality MINUTES  # generator 0 made with batch4x against the
#                                           # default one: fidelity and memorisation, paired
#   bash tools/gpu/session.sh steplevers MINUTES  # the classifier's step levers (CUDA graph,
#                                           # torch.compile) beside its default, per model
#   bash tools/gpu/session.sh window SPLIT G MINUTES  # chapter 7's unit of GPU work: generator
#                                           # g of SPLIT (and its leaky twin), then every
#                                           # tier-1 repeat that uses it, then real-only cells
#
# Written for jobs of about 15 minutes in all (start and transfers included) whose command
# may run 10, so each stage is budgeted in wall minutes (decimals allowed) and packs what it
# made under $OUT (at most 8 files of 16 MiB each are brought back), even when cut short:
#   $OUT/session.tgz   benchmarks/*, results/*.jsonl and strength_sweep_*.json, figures
#                      this call wrote
#   $OUT/gen-<dir>.pt  each finished leak-free generator (cache/generators/<dir>/generator.pt)
#   $OUT/session.log   everything printed
# Back here, `bash tools/gpu/collect.sh <files_at>` unpacks it into the repo.
#
# Every step is cut to the stage's deadline (checks: 9 minutes; grid/all: MINUTES), keeping
# 30 s to pack, so the archive comes back even when the work does not finish: give the
# job a time limit a minute above it.
# Knobs (environment): TRAIN_GEN=1 (`grid` first trains the five leak-free generators;
# off by default: they take 21-26 minutes of H100 time together, more than a 15-minute job,
# and one that does not finish is lost with the machine: benchmarks/README.md, "The grid's
# budget in 15-minute jobs"), GEN_MINUTES (generator training, default 5),
# GEN_LEAKY=1 (also train the 5 leaky-ablation generators, in parallel with the others),
# SKIP_GEN=1 (`quality` trains no generator: a second job on a machine that still has it),
# GRID_ARGS (extra `grid` arguments, e.g. "--available-generators": the repeats of
# synthetic cells whose generator is here run now, the rest later; their run keys carry
# the generator's recipe, so a later recipe retrains them rather than mixing the two),
# SKIP_GEN_OUT=1 (send no generators back: they came back from an earlier call or were
# carried in; `all` and `chapters` set it, as they train none),
# BENCH_MODELS (default "basic_cnn resnet18 vit_tiny"; in `all`, the models of its first,
# card-missing rows), BENCH_ARGS (extra `bench train` arguments; `all` uses "--naive-replicates
# 1 --serial-replicates 1 --profile" and one lever per row), BENCH_CAP (seconds per model,
# default 110; `all`: 60 for the basic CNN's default row, 180 for ResNet-18's and ViT-Tiny's,
# 45-150 for the lever rows).
set -uo pipefail
stage=${1:?usage: session.sh checks | grid MINUTES | all MINUTES | quality MINUTES | chapters MINUTES | levers MINUTES | genquality MINUTES | steplevers MINUTES | window SPLIT G MINUTES}
given="$*"
if [ "$stage" = window ]; then  # window SPLIT G MINUTES: the deadline is the 4th argument
  win_split=${2:?window needs SPLIT G MINUTES, e.g. window slice 0 9.5}
  win_g=${3:?window needs SPLIT G MINUTES}
  case "$win_split" in slice|subject) ;; *) echo "window: SPLIT must be slice or subject, not '$win_split'" >&2; exit 2 ;; esac
  case "$win_g" in ''|*[!0-9]*) echo "window: G must be a generator number from 0, not '$win_g'" >&2; exit 2 ;; esac
  set -- "$stage" "${4:?window needs SPLIT G MINUTES}"
fi
OUT=${OUT:-/tmp/mrilib-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1 MRILIB_PRESET=${MRILIB_PRESET:-thesis}
export MRILIB_DATA=${MRILIB_DATA:-$PWD/.gpudata/alzheimer_mri}
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else  # mrilib from this tree, also for scripts outside the root (tools/gpu/run_notebook.py)
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
DEVICE=${DEVICE:-cuda}
case "${GRID_ARGS:-}" in  # its rows go to results/imagenet/, which nothing here packs
  *--imagenet*) echo "GRID_ARGS: --imagenet runs are not packed by session.sh; run them" \
                     "with python -m mrilib grid --imagenet where the weights are" >&2; exit 2 ;;
esac
echo "session: bash tools/gpu/session.sh $given | MRILIB_PRESET=$MRILIB_PRESET TRAIN_GEN=${TRAIN_GEN:-0} SKIP_GEN=${SKIP_GEN:-0} GEN_MINUTES=${GEN_MINUTES:-5} GEN_LEAKY=${GEN_LEAKY:-0}${GRID_ARGS:+ GRID_ARGS=\"$GRID_ARGS\"} | started $(date -u +%Y-%m-%dT%H:%MZ)"
if [ -f .gpudata/GIT_STATE ]; then  # written by prepare.sh: every result row names its commit
  read -r MRILIB_GIT_COMMIT MRILIB_GIT_DIRTY code_digest < .gpudata/GIT_STATE
  # The code that came is the code prepare.sh saw, or the rows must not name that commit
  # as clean (prepare.sh was not rerun after a change): the same digest on both sides.
  if [ "$(bash tools/gpu/code_digest.sh)" != "${code_digest:-}" ]; then
    echo "warning: mrilib/, tools/ or notebooks/ differ from commit $MRILIB_GIT_COMMIT as prepare.sh" \
      "recorded it (rerun prepare.sh before a remote job); rows are marked git_dirty"
    MRILIB_GIT_DIRTY=1
  fi
  export MRILIB_GIT_COMMIT MRILIB_GIT_DIRTY
fi
start=$(date +%s)
touch /tmp/session-start  # figures newer than this were made by this call and go back
elapsed_min() { echo $(( ($(date +%s) - start) / 60 )); }
deadline=$(( start + $(awk -v m="${2:-9}" 'BEGIN { printf "%d", 60 * m }') - 30 ))
left_s() { echo $(( deadline - $(date +%s) )); }
within() {  # within CAP_SECONDS cmd...: run cmd for at most CAP s and never past the deadline
  local cap=$1; shift
  local left=$(( deadline - $(date +%s) ))
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -le 5 ]; then echo "skipped (no time left): $*"; return 1; fi
  timeout "$cap" "$@"
  local rc=$?
  [ "$rc" = 124 ] && echo "stopped at its time limit (${cap} s): $*"
  return "$rc"
}

# The preset's results folder (results/ for thesis, cache/<preset>/results otherwise).
results=$($PY -c "import os; from mrilib.paths import results_dir; print(os.path.relpath(results_dir()))")
# A warm machine keeps /tmp between calls, but each call's tree replaces results/ with the
# checkout's (seen: a second grid call retrained the first call's cells). Carry the rows
# over when the checkout's file is a prefix of the kept one (same base, appended here).
keep=/tmp/mrilib-results
if [ -f "$keep/runs.jsonl" ]; then
  here=$( [ -f "$results/runs.jsonl" ] && stat -c %s "$results/runs.jsonl" || echo 0)
  if [ "$here" = 0 ] || cmp -s -n "$here" "$results/runs.jsonl" "$keep/runs.jsonl"; then
    mkdir -p "$results" && cp "$keep/runs.jsonl" "$keep/epochs.jsonl" "$results/"
    echo "results: $(wc -l < "$results/runs.jsonl") runs kept from this machine's last call"
  fi
fi
pack() {  # whatever exists now goes back, even after a timeout
  [ -f "$results/runs.jsonl" ] && mkdir -p "$keep" && \
    cp "$results/runs.jsonl" "$results/epochs.jsonl" "$keep/" 2>/dev/null
  local files=()
  for f in benchmarks/bench-train-*.txt benchmarks/bench-train-*.json \
           benchmarks/local_generator_*.json benchmarks/generator-levers-*.json \
           benchmarks/tests-gpu.log \
           "$results"/strength_sweep_*.json "$results"/shortcut_*.json \
           "$results"/lever_quality_*.json \
           "$results/runs.jsonl" "$results/epochs.jsonl"; do
    [ -e "$f" ] && files+=("$f")
  done
  while IFS= read -r f; do files+=("$f"); done < <(
    [ -d figures ] && find figures -maxdepth 1 -name '*.png' -newer /tmp/session-start | sort)
  [ ${#files[@]} -gt 0 ] && tar czf "$OUT/session.tgz" "${files[@]}"
  # Finished leak-free generators, one file each (12 MiB; a file may be 16, all 64): they
  # let chapters 2-3 run here in the thesis preset. Leaky ones are not needed here. The
  # results archive and the log go first; generators only while $OUT stays < 62 MiB.
  local n=0 used finished=""
  if [ "${SKIP_GEN_OUT:-0}" != 1 ] && compgen -G "cache/generators/x*/generator.pt" > /dev/null; then
    # the finished ones, in one Python start (several cost seconds past the deadline)
    finished=$($PY - cache/generators/x*/generator.pt <<'PY' 2>/dev/null
import sys
from mrilib.synthetic.diffusion import training_record
for path in sys.argv[1:]:
    try:
        if training_record(path)["done"]:
            print(path)
    except Exception:  # unreadable: not sent
        pass
PY
)
  fi
  for f in $finished; do
    used=$(du -cb "$OUT" | tail -1 | cut -f1)
    [ $(( used + $(stat -c %s "$f") )) -lt $(( 62 * 1048576 )) ] || { echo "no room left in \$OUT: $f stays"; continue; }
    cp "$f" "$OUT/gen-$(basename "$(dirname "$f")").pt" && n=$((n + 1))
  done
  echo "packed ${#files[@]} files into session.tgz and $n generators after $(elapsed_min) min"
  echo "wall: $(( $(date +%s) - start )) s"
}
trap pack EXIT

$PY - <<'PY'
import torch, platform
print(f"torch {torch.__version__} | cuda {torch.version.cuda} | "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU'} | "
      f"python {platform.python_version()}")
PY
mkdir -p benchmarks
rm -f benchmarks/tests-gpu.log  # this call's tests only (a warm machine keeps the last call's)
# Decode the JPEGs once into cache/data/ now, rather than in each of the parallel
# generator processes below at the same time.
within 120 $PY -m mrilib data --source "$MRILIB_DATA" > /dev/null
cuda_tests() {  # [GPU_TESTS=files] cuda_tests [CAP]: the GPU-marked tests of #3-#5
  # In the quick preset, as the README's test command: tests/conftest.py keeps a preset
  # already set, and under this script's thesis preset the generator and Grad-CAM tests
  # train thesis-sized models (cut off at 120 s in two jobs; 22 s in the quick preset).
  # shellcheck disable=SC2086
  MRILIB_PRESET=quick within "${1:-150}" $PY -m pytest -q -rs --durations=8 -p no:cacheprovider -m gpu \
    ${GPU_TESTS:-tests/test_train.py tests/test_augment.py tests/test_diffusion.py tests/test_cam.py} \
    ${GPU_K:+-k "$GPU_K"} \
    2>&1 | tee -a benchmarks/tests-gpu.log
}
card=$($PY -c "import re, torch; print(re.sub('[^a-z0-9]+', '_', (torch.cuda.get_device_name(0)
  if torch.cuda.is_available() else 'cpu').lower()).strip('_'))")
synth_bench() {  # unguided, as the earlier local_generator_<card>.json files
  within "${1:-75}" $PY -m mrilib synth bench --device "$DEVICE" --guidance 1 \
    --out "benchmarks/local_generator_$card.json"; }
bench_train() {
  for m in ${BENCH_MODELS:-basic_cnn resnet18 vit_tiny}; do
    # shellcheck disable=SC2086
    within "${BENCH_CAP:-110}" $PY -m mrilib bench train --model "$m" --device "$DEVICE" \
      --out benchmarks ${BENCH_ARGS:-}
  done
}
read -r G X SUBSET < <($PY -c "from mrilib.grid import grid_settings as s; c = s();
print(c['samples'], c['generator_fraction'], int(c['data_fraction'] < 1))")
generators() {  # generators FIRST LAST MINUTES [SPLIT]: leak-free generators FIRST..LAST of
  # SPLIT (default subject) in parallel processes, with GEN_LEAKY=1 their leaky twins too.
  # One small UNet leaves most of the GPU idle. A generator that cannot finish is lost
  # with the machine (its checkpoint is too big to come back), so size MINUTES to finish.
  local first=$1 last=$2 gen=$3 split=${4:-subject} pids=() g
  rm -f /tmp/gen-*.log
  for g in $(seq "$first" "$last"); do
    within "$(awk -v m="$gen" 'BEGIN { printf "%d", 60 * m + 60 }')" $PY -m mrilib synth train \
      --split "$split" --real-frac "$X" --seed "$g" --minutes "$gen" --device "$DEVICE" \
      > "/tmp/gen-$g.log" 2>&1 & pids+=($!)
    if [ "${GEN_LEAKY:-0}" = 1 ]; then
      within "$(awk -v m="$gen" 'BEGIN { printf "%d", 60 * m + 60 }')" $PY -m mrilib synth train \
        --split "$split" --real-frac "$X" --seed "$g" --leaky --minutes "$gen" --device "$DEVICE" \
        > "/tmp/gen-leaky-$g.log" 2>&1 & pids+=($!)
    fi
  done
  wait "${pids[@]}"
  tail -n 2 /tmp/gen-*.log
}
grid() {  # the thesis grid for the time left (cells whose generators are missing: blocked)
  # --max-minutes skips a cell that would not finish (judged by the last cell of the same model, scaled
  # up by training-set size and vmap groups; a model not seen yet by this card's committed
  # `bench train` row, else 0 s, hence the margin); `within` is the hard stop. A cell's
  # repeats train in one vmap group and are written after it, so a cut-off cell loses
  # all of its repeats, never those of finished cells (rows are fsync'd).
  # 20 s are kept for the list at the end, which runs inside the deadline too.
  local left; left=$(( $(left_s) - 20 ))
  if [ "$left" -ge 100 ]; then
    # shellcheck disable=SC2086
    within "$left" $PY -m mrilib grid --preset "$MRILIB_PRESET" --resume --device "$DEVICE" \
      --max-minutes "$(awk -v s="$left" 'BEGIN { printf "%.1f", (s - 45) / 60 }')" ${GRID_ARGS:-}
  fi
  within 20 $PY -m mrilib grid --preset "$MRILIB_PRESET" --list | tail -n 3
}

case "$stage" in
  checks)
    cuda_tests
    synth_bench 75
    bench_train
    ;;
  grid)
    : "${2:?grid needs MINUTES, e.g. 9}"
    # With TRAIN_GEN=1, the G = 5 leak-free generators (30% samples, shared by every
    # fraction) first. The grid runs without --train-generators: cells whose generators
    # are missing (all of them by default; the leaky ablation unless GEN_LEAKY=1) are
    # listed as blocked and skipped before their time is judged, and the real-only cells
    # that fit the time run.
    [ "${TRAIN_GEN:-0}" = 1 ] && generators 0 $(( G - 1 )) "${GEN_MINUTES:-5}" "${GEN_SPLIT:-subject}"
    grid
    ;;
  all)
    : "${2:?all needs MINUTES, e.g. 9.5}"
    SKIP_GEN_OUT=1  # generators here were carried in: they need not come back
    # One job, ordered by what is still unmeasured (see benchmarks/README.md): where this
    # card has none, ResNet-18 and ViT-Tiny against the notebook loop (180 s each; the
    # H100 has them). Then the CUDA tests of the generator and Grad-CAM
    # and the stems' (passed on the H100 but for the stems'), the basic CNN where this
    # card has no benchmark yet, then one lever per row: the stems as unfold + matmul
    # (`--im2col-stem`: vmap's depthwise path was 12% of ResNet-18's device time) for the
    # basic CNN and ResNet-18, testing at the ends only (29% of the basic CNN's epoch is
    # evaluation), and ViT-Tiny with 60 replicates at once (host-bound at 20, device busy
    # 42%: whether training the grid's cells of equal size together would pay). Then the strength sweep of generator 0 if it was carried in
    # (prepare.sh carries it only when asked: CARRY_GEN0=1; `chapters` makes chapter 2-3's
    # figures from it), the generator's unguided speed where this card has none, the rest
    # of the CUDA tests, then the grid. No generators are trained: five take 21-26 minutes
    # and only two can travel (see benchmarks/README.md); `quality` trains generator 0,
    # `TRAIN_GEN=1 ... grid` all five.
    for m in ${BENCH_MODELS:-resnet18 vit_tiny}; do
      compgen -G "benchmarks/bench-train-$m-none-${card//_/-}-profile.json" > /dev/null || \
        BENCH_MODELS=$m BENCH_ARGS=${BENCH_ARGS:-"--naive-replicates 1 --serial-replicates 1 --profile"} \
        BENCH_CAP=${BENCH_CAP:-180} bench_train
    done
    GPU_TESTS="tests/test_diffusion.py tests/test_cam.py
      tests/test_train.py::test_cuda_testing_only_final_and_best_epochs_gives_the_same_records
      tests/test_train.py::test_cuda_im2col_stems_train_as_the_convolutions_do" \
      cuda_tests 90
    base="benchmarks/bench-train-basic_cnn-none-${card//_/-}"  # the default protocol's files
    [ -e "$base.json" ] || [ -e "$base-profile.json" ] || \
      BENCH_MODELS=basic_cnn BENCH_ARGS="--naive-replicates 1 --serial-replicates 1 --profile" \
      BENCH_CAP=60 bench_train
    # The lever rows time (c) alone: each is read against this card's default row.
    lever="--naive-replicates 0 --serial-replicates 0"
    BENCH_MODELS=basic_cnn BENCH_ARGS="$lever --im2col-stem --profile" BENCH_CAP=45 bench_train
    BENCH_MODELS=resnet18 BENCH_ARGS="$lever --im2col-stem --profile" BENCH_CAP=120 bench_train
    BENCH_MODELS=basic_cnn BENCH_ARGS="$lever --test-at-ends --profile" BENCH_CAP=45 bench_train
    BENCH_MODELS=vit_tiny BENCH_ARGS="$lever --replicates 60" BENCH_CAP=150 bench_train
    # With generator 0 carried in (CARRY_GEN0=1): class fidelity, distance from the source
    # and background at five strengths over its whole sample, unguided (#4: the default
    # strength 0.6 kept NonDemented but lost most ModerateDemented variations), about 90 s.
    if compgen -G "cache/generators/x${X}-s0-*/generator.pt" > /dev/null; then
      within 150 $PY -m mrilib synth sweep --real-frac "$X" --device "$DEVICE" --guidance 1 \
        --strengths 0.3,0.4,0.5,0.6,0.8 --out "$results/strength_sweep_x${X}_g0.json" \
        2> /tmp/sweep.err | tail -n 8 || tail -n 5 /tmp/sweep.err
    fi
    [ -f "benchmarks/local_generator_$card.json" ] || synth_bench 40
    GPU_TESTS="tests/test_train.py tests/test_augment.py
      --deselect tests/test_train.py::test_cuda_testing_only_final_and_best_epochs_gives_the_same_records
      --deselect tests/test_train.py::test_cuda_im2col_stems_train_as_the_convolutions_do" \
      cuda_tests 150
    grid
    ;;
  quality)
    : "${2:?quality needs MINUTES, e.g. 9.5}"
    # #4 in one job: generator 0 of the grid's 30% sample, trained on the zero-terminal-
    # SNR schedule with v-prediction (the first one, on DDPM's linear schedule, painted
    # grey: see mrilib/synthetic/diffusion.py) and with class dropout for classifier-free
    # guidance, then `synth sweep` over its whole sample at six strengths: class fidelity,
    # distance from the source, background, unguided; then guidance weights 1, 2, 4.
    # The generator (12 MiB) comes back; `chapters` makes the chapter 2-3 figures from
    # it in a later call. About 5.2 minutes of training on an H100 (benchmarks/).
    [ "${SKIP_GEN:-0}" = 1 ] || generators 0 0 "${GEN_MINUTES:-6}"
    sweep_json="$results/strength_sweep_x${X}_g0.json"
    # (its progress bars, one line per update without a terminal, go to a file)
    # SWEEP_STRENGTHS: fewer for a short job
    within 150 $PY -m mrilib synth sweep --real-frac "$X" --device "$DEVICE" --guidance 1 \
      --strengths "${SWEEP_STRENGTHS:-0.3,0.4,0.5,0.6,0.8,1.0}" --out "$sweep_json" \
      2> /tmp/sweep.err | tail -n 9 || tail -n 5 /tmp/sweep.err
    # Classifier-free guidance (the generator learns a class-free output too): what weights
    # 2 and 4 do to class fidelity at the default strength and for fresh samples, on 100
    # sources per class (all ModerateDemented ones); the unguided rows come from the cache
    # of the sweep above. About 40 s on an H100; its variations stay there.
    within 90 $PY -m mrilib synth sweep --real-frac "$X" --device "$DEVICE" \
      --strengths "${GUIDED_STRENGTHS:-0.6,1.0}" --guidance 1,2,4 --max-sources "${GUIDED_SOURCES:-400}" \
      --out "$results/strength_sweep_x${X}_g0_guidance.json" 2> /tmp/sweep.err | tail -n 9 \
      || tail -n 5 /tmp/sweep.err
    GPU_TESTS="tests/test_diffusion.py" cuda_tests 60
    grid
    ;;
  chapters)
    : "${2:?chapters needs MINUTES, e.g. 9}"
    # #4's last steps, with generator 0 carried in (CARRY_GEN0=1 bash tools/gpu/prepare.sh;
    # nothing is trained): chapters 2-3 under the default guidance weight (4), whose
    # variations take hours on a CPU (about a second per image per DDIM step, twice that
    # guided) and a few minutes here.
    SKIP_GEN_OUT=1  # the generator came from here
    if ! compgen -G "cache/generators/x${X}-s0-*/generator.pt" > /dev/null; then
      echo "chapters: generator 0 was not carried in (CARRY_GEN0=1 bash tools/gpu/prepare.sh)"
      exit 2
    fi
    # 1. The weight at the default strength on up to 200 sources per class (all 14
    # ModerateDemented; the 2026-11-26 H100 run measured 1, 2, 4 on 50 per class; 3 and 6
    # bracket the default), about 80 s. First, so that notebook 02 draws it (saved_sweeps).
    within 150 $PY -m mrilib synth sweep --real-frac "$X" --device "$DEVICE" \
      --strengths 0.6 --guidance 1,3,4,6 --max-sources 800 \
      --out "$results/strength_sweep_x${X}_g0_guidance_all.json" \
      2> /tmp/sweep.err | tail -n 9 || tail -n 5 /tmp/sweep.err
    # 2. Notebooks 02 and 03 in the thesis preset, their cells run as one script each (no
    # Jupyter there): their figures (figures/2_*, 3_*) come back in session.tgz. About 3
    # and 1 minutes.
    for nb in notebooks/02_synthetic_images.ipynb notebooks/03_gradcam_real_vs_synthetic.ipynb; do
      within 300 $PY tools/gpu/run_notebook.py "$nb" 2>&1 | tr '\r' '\n' \
        | grep -Ev '[0-9](it|img|step)/s|s/(it|img|step)' | tail -n 40  # no progress bars
    done
    # 3. What guidance costs per 1,000 variations (the target is 30 s).
    within 75 $PY -m mrilib synth bench --device "$DEVICE" --guidance 4 \
      --out "benchmarks/local_generator_${card}-guidance4.json"
    ;;
  levers)
    : "${2:?levers needs MINUTES, e.g. 9}"
    # The generator's speed levers, each timed beside the default in one process on random
    # slices: training images/s, variations/s at guidance 1 and 4, one JSON row per lever
    # written as it finishes (benchmarks/README.md, "Generator levers: predicted"). A lever
    # that changes results (batchKx) is judged on quality by a sweep of a generator made so.
    within "$(( $(left_s) - 20 ))" $PY -m mrilib synth bench --device "$DEVICE" --guidance 1,4 \
      --levers "${LEVERS:-compile,channels_last,autotune,samplebatch4x,batch4x,compile+channels_last+batch4x}" \
      --out "benchmarks/generator-levers-$card.json"
    ;;
  genquality)
    : "${2:?genquality needs MINUTES, e.g. 9.5}"
    # A lever that changes the generator (QUALITY_LEVER, default batch4x) is kept only if
    # its generator is no worse than the default's: generator 0 of the subject split made
    # both ways in parallel (GEN_MINUTES each, default 6; the default took 5.2 on an H100),
    # then `synth lever-quality` on its whole sample at the default strength and guidance
    # (~1,400 variations each, cached), the same real-only classifier and nearest-real
    # distances, paired. Both generators come back (the default is chapters 2-3's).
    lever=${QUALITY_LEVER:-batch4x}
    gen_cap=$(awk -v m="${GEN_MINUTES:-6}" 'BEGIN { printf "%d", 60 * m + 60 }')
    rm -f /tmp/gen-0*.log
    pids=()
    for extra in "" "--lever $lever"; do
      # shellcheck disable=SC2086
      within "$gen_cap" $PY -m mrilib synth train --split subject --real-frac "$X" --seed 0 \
        --minutes "${GEN_MINUTES:-6}" --device "$DEVICE" $extra \
        > "/tmp/gen-0${extra:+-lever}.log" 2>&1 & pids+=($!)
    done
    wait "${pids[@]}"  # these only: a bare wait also waits for the log's tee
    tail -n 2 /tmp/gen-0*.log
    within "$(( $(left_s) - 10 ))" $PY -m mrilib synth lever-quality --lever "$lever" \
      --split subject --real-frac "$X" --generator 0 --device "$DEVICE" \
      --out "$results/lever_quality_${lever}_x${X}_g0.json" 2> /tmp/quality.err \
      || tail -n 5 /tmp/quality.err
    ;;
  steplevers)
    : "${2:?steplevers needs MINUTES, e.g. 9}"
    # The classifier's step levers (benchmarks/README.md, "Classifier step levers:
    # predicted"), per model: its lever tests on this card, the default row (beside one
    # notebook-loop replicate), then a row per lever, each 20 replicates x 10 epochs testing
    # at the ends as the grid does. STEP_LEVERS: flag sets, + joining flags of one row.
    for m in ${BENCH_MODELS:-basic_cnn vit_tiny resnet18}; do
      GPU_TESTS=tests/test_stacked_step.py GPU_K="$m" cuda_tests "${STEP_TEST_CAP:-150}"
      # shellcheck disable=SC2086
      within "${BENCH_CAP:-150}" $PY -m mrilib bench train --model "$m" --device "$DEVICE" \
        --out benchmarks --test-at-ends --naive-replicates 1 --serial-replicates 0 ${BENCH_ARGS:-}
      levers=${STEP_LEVERS:---cuda-graph --compile-step --compile-step+--cuda-graph}
      # ResNet-18 is kernel-bound under vmap: its replicates with dense kernels, graphed,
      # then also each on its own stream (parallel branches of the graph)
      [ "$m" = resnet18 ] && [ -z "${STEP_LEVERS:-}" ] && levers="$levers --replicate-loop+--cuda-graph --replicate-loop+--replicate-streams+--cuda-graph"
      # A window trains a cell's 4 repeats of g as one group: does it cost what 20 do?
      [ "$m" = basic_cnn ] && [ -z "${STEP_LEVERS:-}" ] && levers="$levers --replicates+4"
      for lever in $levers; do
        # shellcheck disable=SC2086
        within "${BENCH_CAP:-150}" $PY -m mrilib bench train --model "$m" --device "$DEVICE" \
          --out benchmarks --test-at-ends --naive-replicates 0 --serial-replicates 0 \
          ${lever//+/ } ${BENCH_ARGS:-}
      done
    done
    ;;
  window)
    # Chapter 7 in GPU windows (docs/decisions.md, "The grid"): each window makes one
    # generator g of one split and everything that uses it, so nothing waits on a generator
    # that cannot travel. 1. Generator g and its leaky twin (the 30% ablation) in parallel,
    # GEN_MINUTES each (default 6: 4.3-5.2 minutes measured on an H100; an unfinished one
    # is lost). 2. The tier-1 grid of SPLIT with --available-generators: each synthetic
    # cell's repeats r = g (mod G) draw g's variations once and train; the real-only cells
    # fill the time left. Both generators come back (12 MiB each) for the next windows'
    # records; collect.sh keeps the subject split's generator 0 in generators/ for git.
    # (A preset whose grid runs on a data subset, quick, has generators of that subset: there
    # the grid trains them, all G of them, which a dry run on a CPU can afford.)
    if [ "$SUBSET" = 1 ]; then
      GRID_ARGS="--tier 1 --split $win_split --train-generators ${GRID_ARGS:-}" grid
    else
      GEN_LEAKY=${GEN_LEAKY:-1} generators "$win_g" "$win_g" "${GEN_MINUTES:-6}" "$win_split"
      GRID_ARGS="--tier 1 --split $win_split --available-generators ${GRID_ARGS:-}" grid
    fi
    ;;
  *) echo "unknown stage $stage: use checks, grid, all, quality, chapters, levers, genquality, steplevers (with MINUTES) or window SPLIT G MINUTES" >&2; exit 2 ;;
esac
