#!/usr/bin/env bash
# The files of a synthsr-bids derivatives folder, one relative path a line, sorted:
# what .circleci/expected_outputs.txt holds. Run logs (names carry a run id) and the
# lock files (shared files, group level) are left out.
#   .circleci/list_outputs.sh DERIVATIVES_DIR
set -euo pipefail
cd "${1:?usage: list_outputs.sh DERIVATIVES_DIR}"
find . -type f -not -path './logs/*' -not -path './sub-*/log/*' -not -name '.synthsr-bids.lock' -not -name '.synthsr-bids-group.lock' \
  | sed 's|^\./||' | LC_ALL=C sort
