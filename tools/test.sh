#!/usr/bin/env bash
# Runs the test matrix of tox.ini on a fresh machine and prints one table of
# environment -> passed/failed/skipped. Extra arguments go to tox, e.g.
#   bash tools/test.sh -e py39-tf29
# Set GRADACCUM_README=1 to rewrite README's "Supported versions" table from
# the environments that ran.
source "$(dirname "$0")/bootstrap.sh"
rm -rf .tox/reports
status=0
"$TOX" run-parallel --parallel 2 --parallel-no-spinner "$@" || status=$?
report_args=()
[ $# -gt 0 ] && report_args+=(--only-ran)
[ "${GRADACCUM_README:-0}" = 1 ] && report_args+=(--readme README.md)
"$TOOLS_VENV/bin/python" tools/matrix_report.py .tox/reports "${report_args[@]}" || status=$((status ? status : 1))
exit $status
