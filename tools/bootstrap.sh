# Sourced by tools/test.sh and tools/demo.sh: makes a fresh machine ready to run tox.
# - puts every pyenv interpreter on PATH by name (python3.7 ... python3.13),
#   so tox finds the ones its environments ask for;
# - creates .venv-tools with pinned tox and tox-uv (uv creates the test
#   environments, Python 3.7 included, and installs TF wheels fast).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYENV_VERSIONS=${PYENV_ROOT:-$HOME/.pyenv}/versions
TOOLS_PYTHON=${TOOLS_PYTHON:-$PYENV_VERSIONS/3.11.7/bin/python}
for bin in "$PYENV_VERSIONS"/*/bin; do
    PATH="$PATH:$bin"
done
export PATH
# uv must use the interpreters found above, never download one.
export UV_PYTHON_DOWNLOADS=never
TOOLS_VENV="$ROOT/.venv-tools"
if [ ! -x "$TOOLS_VENV/bin/tox" ]; then
    "$TOOLS_PYTHON" -m venv "$TOOLS_VENV"
    "$TOOLS_VENV/bin/pip" install --quiet --disable-pip-version-check "tox==4.67.15" "tox-uv==1.37.1" "uv==0.13.9"
fi
TOX="$TOOLS_VENV/bin/tox"
cd "$ROOT"
