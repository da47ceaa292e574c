#!/usr/bin/env bash
# Runs the test matrix of tox.ini on a fresh machine: bash tools/test.sh [tox args]
source "$(dirname "$0")/bootstrap.sh"
exec "$TOX" run-parallel --parallel 2 --parallel-live "$@"
