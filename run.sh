#!/usr/bin/env bash
# One entry point for a fresh machine; each command sets up what it needs first.
#   bash run.sh app     install (once) and start the dashboard on http://localhost:8501
#   bash run.sh test    install (once, plus Chromium for the browser test) and run the test suite
#   bash run.sh setup   only install
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
  fi
  # The stamp skips a slow no-op pip run when requirements.txt has not changed.
  if [ ! -f .venv/.requirements.stamp ] || ! cmp -s requirements.txt .venv/.requirements.stamp; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements.txt
    cp requirements.txt .venv/.requirements.stamp
  fi
}

browser() {
  # Headless Chromium for the real-browser smoke test (Debian packages).
  if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
    elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
      sudo apt-get update -qq && sudo apt-get install -y -qq chromium chromium-driver >/dev/null
    else
      echo "note: install chromium and chromedriver to run the browser smoke test" >&2
    fi
  fi
}

case "${1:-}" in
  setup) setup ;;
  app)
    setup
    shift
    exec .venv/bin/streamlit run streamlit_app.py "$@"
    ;;
  test)
    setup
    browser
    shift
    exec .venv/bin/python -m pytest "$@"
    ;;
  *)
    echo "usage: bash run.sh {app|test|setup} [extra arguments]" >&2
    exit 2
    ;;
esac
