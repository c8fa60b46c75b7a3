#!/usr/bin/env bash
# The project's two entry points on a fresh machine (see README):
#   ./run.sh demo   set up, then run the main job on the embedded synthetic data
#   ./run.sh test   set up, then run the linter and the test suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}

setup() {
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    local stamp="$VENV/.installed-$(cat setup.cfg pyproject.toml | sha1sum | cut -c1-12)"
    if [ ! -f "$stamp" ]; then
        python -m pip install -q --upgrade pip
        python -m pip install -q torch==2.13.0          # CPU wheel first: a bare requirement pulls CUDA
        python -m pip install -q -e ".[test,tracking]"  # tracking: MLflow for --tracking mlflow and its test
        touch "$stamp"
    fi
}

case "${1:-}" in
    test)
        setup
        ruff check .
        python -m pytest   # exits non-zero on failures and on "no tests collected" (5)
        ;;
    demo)
        setup
        shift
        python -m scripts.demo "$@"
        ;;
    setup)
        setup
        ;;
    *)
        echo "usage: ./run.sh {demo|test|setup}" >&2
        exit 2
        ;;
esac
