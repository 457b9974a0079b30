#!/usr/bin/env bash
# Run HERE after a remote job of tools/gpu/session.sh: bash tools/gpu/collect.sh FILES_AT
# (FILES_AT = the folder holding the files brought back: session.tgz, gen-*.pt, session.log).
# First checks that every run both sides hold is the same row on both (else it stops
# with nothing applied), then unpacks benchmarks into benchmarks/ (the CUDA tests' log
# into benchmarks/logs/), figures into figures/, generators into cache/generators/ (and
# chapters 2-3's into generators/, for git), and
# appends the runs this checkout lacks to results/ with their epoch rows
# (mrilib.grid.merge_results), then rewrites the CSV exports, the report and its
# figures. Review `git diff` and commit.
set -euo pipefail
src=${1:?usage: collect.sh FILES_AT}
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-.venv/bin/python}
[ -f "$src/session.tgz" ] || { echo "no session.tgz in $src (see $src/session.log)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xzf "$src/session.tgz" -C "$tmp"
# The results first, before anything is copied: a run both sides hold must be the same
# row on both (mrilib.grid.merge_results), else nothing of this call is applied.
runs=$(cd "$tmp" && find . -name runs.jsonl | head -1)
if [ -n "$runs" ]; then
  dir=$(dirname "${runs#./}")   # results (thesis) or cache/<preset>/results
  preset=thesis; [ "$dir" = results ] || preset=$(basename "$(dirname "$dir")")
  "$PY" -c "import sys; from mrilib.grid import merge_results as m
have, new = m(sys.argv[1], sys.argv[2], check_only=True)
print(f'results: {have} runs here, {new} new from the GPU')" "$tmp/$dir" "$dir" || exit 1
fi
[ -f "$src/session.log" ] && mkdir -p benchmarks/logs && \
  cp "$src/session.log" "benchmarks/logs/session-$(date -u +%Y%m%dT%H%M%SZ).log"
if [ -d "$tmp/benchmarks" ]; then cp -r "$tmp/benchmarks/." benchmarks/; fi
[ -f benchmarks/tests-gpu.log ] && mkdir -p benchmarks/logs && \
  mv benchmarks/tests-gpu.log "benchmarks/logs/tests-gpu-$(date -u +%Y%m%dT%H%MZ).log"
if [ -d "$tmp/figures" ]; then  # the figures notebooks made there (session.sh chapters)
  mkdir -p figures && cp "$tmp"/figures/*.png figures/ && \
    echo "figures: $(cd "$tmp/figures" && ls *.png | tr '\n' ' ')"
fi
# sweeps, shortcut checks, a generator lever's quality
for f in "$tmp"/results/strength_sweep_*.json "$tmp"/results/shortcut_*.json \
         "$tmp"/results/lever_quality_*.json; do
  [ -e "$f" ] && cp "$f" results/ && echo "kept: results/$(basename "$f")"
done
for f in "$src"/gen-*.pt; do
  [ -e "$f" ] || continue
  name=$(basename "$f" .pt); name=${name#gen-}
  mkdir -p "cache/generators/$name" && cp "$f" "cache/generators/$name/generator.pt"
  echo "generator: cache/generators/$name/generator.pt"
done
# The generator chapters 2-3 use (subject split, the grid's X, g = 0) is kept in git.
if [ "${MRILIB_PRESET:-thesis}" = thesis ] && compgen -G "$src/gen-x*.pt" > /dev/null; then
  X=$("$PY" -c "from mrilib.grid import grid_settings as s; print(s('thesis')['generator_fraction'])")
  "$PY" -m mrilib synth keep --split subject --real-frac "$X" --seed 0 2>/dev/null \
    || echo "generators/: chapters 2-3's generator was not among these (kept as before)"
fi
if [ -n "$runs" ]; then
  before=$( [ -f "$dir/runs.jsonl" ] && wc -l < "$dir/runs.jsonl" || echo 0)
  # Only the runs this side lacks are appended, each with its epoch rows.
  "$PY" -c "import sys; from mrilib.grid import merge_results as m
m(sys.argv[1], sys.argv[2])" "$tmp/$dir" "$dir" || exit 1
  # One line per GPU chunk in the results folder's README: what ran, where, how long.
  log="$src/session.log"; readme="$dir/README.md"
  after=$(wc -l < "$dir/runs.jsonl")
  if [ -f "$log" ] && [ "$after" -gt "$before" ]; then  # a session that trained no run: no row
    [ -f "$readme" ] || printf '%s\n' "# Results of the chapter-7 grid" "" \
      "Rows: \`runs.jsonl\` (one per training run, with its config, seeds, commit, package" \
      "versions and device) and \`epochs.jsonl\` (one per run and epoch); \`summary.md\` and" \
      "\`../figures/\` are written from them by \`python -m mrilib report\`. Made in chunks on" \
      "time-limited remote GPU jobs with tools/gpu (tools/gpu/README.md); each chunk, as" \
      "collect.sh logged it:" "" \
      "| started (UTC) | command | device | wall | runs added | runs in all |" \
      "| --- | --- | --- | ---: | ---: | ---: |" > "$readme"
    command=$(sed -n 's/^session: \(.*\) | started .*/\1/p' "$log" | head -1 | sed 's/ | /; /g')
    started=$(sed -n 's/^session: .* | started \(.*\)/\1/p' "$log" | head -1)
    device=$(sed -n 's/^torch .* | cuda [^|]* | \(.*\) | python .*/\1/p' "$log" | head -1)
    wall=$(sed -n 's/^wall: \([0-9]*\) s/\1/p' "$log" | tail -1)
    echo "| $started | \`$command\` | $device | ${wall:-?} s | $(( after - before )) | $after |" >> "$readme"
  fi
  "$PY" -c "import sys; from mrilib.grid import export_csv; export_csv(sys.argv[1])" "$dir"
  # The committed results/ through chapter_results, as `make reproduce` writes the report
  # (its first line says where the runs came from); another preset's folder as given.
  if [ "$dir" = results ]; then
    MRILIB_PRESET=$preset "$PY" -m mrilib report
  else
    MRILIB_PRESET=$preset "$PY" -m mrilib report --results "$dir"
  fi
fi
git status --short benchmarks results figures cache/quick 2>/dev/null || true
