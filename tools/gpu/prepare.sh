#!/usr/bin/env bash
# Run HERE (your machine), in any folder of the repo, before a time-limited remote GPU job
# (tools/gpu/README.md).
#
# The job reaches no network and receives only the working tree and the extra paths named
# (64 MiB in all), so this puts two ignored folders in the repo root:
#   .gpudata/alzheimer_mri   the dataset's JPEGs (47 MB; never committed)
#   .whl/                    wheels of what the GPU image lacks (diffusers, grad-cam, ttach),
#                            for its Python 3.12, at the versions of this .venv
#   cache/generators/x0.3-s0-*/generator.pt   generator 0, when finished here (carried as is)
# Then start the job with the extra paths and the command printed at the end.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-.venv/bin/python}
exclude=.git/info/exclude
mkdir -p .git/info && touch "$exclude"
for p in /.gpudata/ /.whl/; do grep -qxF "$p" "$exclude" || echo "$p" >> "$exclude"; done

data=${MRILIB_DATA:-../shared/data/alzheimer_mri}
if [ ! -d .gpudata/alzheimer_mri ]; then
  [ -d "$data" ] || { echo "no dataset at $data: set MRILIB_DATA to the image folder" >&2; exit 1; }
  mkdir -p .gpudata && cp -r "$data" .gpudata/alzheimer_mri
fi

# The tree arrives there without .git: record the commit the results will be made from,
# and a digest of the code, which session.sh checks (rerun this after any change).
printf '%s %s %s\n' "$(git rev-parse HEAD)" \
  "$([ -z "$(git status --porcelain -- mrilib tools notebooks)" ] && echo 0 || echo 1)" \
  "$(bash tools/gpu/code_digest.sh)" > .gpudata/GIT_STATE

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
# Into a new folder first: a failed download leaves the last good .whl in place.
wheels=$(mktemp -d .whl-new.XXXX)
trap 'rm -rf "$wheels"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$wheels" "diffusers==$(version diffusers)"
# grad-cam and ttach publish source archives only (grad-cam's holds its example images,
# 8 MB): build pure-Python wheels of just the packages here instead of carrying those.
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$wheels" "grad-cam==$(version grad-cam)" \
  "ttach==$(version ttach)"
rm -rf .whl && mv "$wheels" .whl

# Generator 0 of the thesis grid's sample, if finished here, travels too (12 MiB) when
# CARRY_GEN0=1: `session.sh all` then runs `synth sweep` on it (class fidelity against
# strength over its whole sample), and `session.sh chapters` runs notebooks 02-03 on it
# (hours on a CPU). Without it the tree is 12 MiB lighter.
# Found as the grid finds it (other presets' generators share the folder name's prefix).
carry=(.gpudata .whl)
[ "${CARRY_GEN0:-0}" = 1 ] && gen=$(MRILIB_PRESET=thesis MRILIB_DATA=.gpudata/alzheimer_mri "$PY" - <<'PY' 2>/dev/null
import os
import mrilib
from mrilib.grid import grid_settings
from mrilib.synthetic.diffusion import generator_path
data = mrilib.load_mri()
try:
    path = generator_path(data, mrilib.split_mri(data), grid_settings()["generator_fraction"], 0)
    print(os.path.relpath(path))
except FileNotFoundError:
    pass
PY
)
[ -n "${gen:-}" ] && carry+=("$gen")
if [ "${STAGE:-all}" = chapters ] && [ -z "${gen:-}" ]; then
  echo "STAGE=chapters needs generator 0 of the thesis grid here, finished, and CARRY_GEN0=1" >&2
  exit 1
fi

# What travels: tracked and untracked-not-ignored files, plus the carried paths.
size=$( (git ls-files -co --exclude-standard -z | xargs -0 cat; find "${carry[@]}" -type f -exec cat {} +) \
  2>/dev/null | wc -c)
echo "the folder to send: $((size / 1048576)) MiB (at most 64 MiB)"
[ "$size" -lt $((64 * 1048576)) ] || { echo "too large to send: trim before calling" >&2; exit 1; }
list=$(printf '"%s", ' "${carry[@]}")
# STAGE and MINUTES only shape the printed command (session.sh documents the stages).
echo "remote job: send the tree with [${list%, }], time limit 600 s, command: bash tools/gpu/session.sh ${STAGE:-all} ${MINUTES:-9.5}"
