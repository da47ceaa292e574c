#!/usr/bin/env bash
# The main job on a fresh machine: trains with accumulation and with the big batch
# and prints how far apart their weights are. bash tools/demo.sh [--n N ...]
source "$(dirname "$0")/bootstrap.sh"
exec "$TOX" run -q -e demo -- "$@"
