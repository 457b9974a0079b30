#!/usr/bin/env bash
# The code a remote job runs, as one digest: prepare.sh records it here beside the commit,
# session.sh recomputes it there. Files by name, as both trees hold them (no .git there;
# caches and hidden folders, which do not travel or differ by machine, left out).
set -euo pipefail
cd "$(dirname "$0")/../.."
find mrilib tools notebooks -type f \( -name '*.py' -o -name '*.sh' -o -name '*.ipynb' \) \
  -not -path '*/.*' -not -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | \
  xargs -0 sha1sum | sha1sum | cut -c1-16
