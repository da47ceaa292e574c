#!/usr/bin/env bash
# Benchmarks on a fresh machine: throughput, memory and convergence of
# accumulate(model, n) against plain Keras, the floor, Keras 3's own option and
# gradient-accumulator 0.5.2. Results go to tools/benchmark/ (results.md,
# benchmark-*.json, convergence.png).   bash tools/benchmark.sh [--quick]
source "$(dirname "$0")/bootstrap.sh"
"$TOX" run -q -e bench-ga -- "$@"
"$TOX" run -q -e bench -- "$@"
.tox/bench/bin/python tools/benchmark.py --merge tools/benchmark
