# Sourced by the scripts: create .venv if missing and (re)install the project when setup.py
# or a C source (compiled by the install; the editable install puts the module in place)
# changed since the last install.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating virtual environment .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.max_deeplab_installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ -n "$(find max_deeplab -name '*.c' -newer "$stamp")" ]; then
  echo "[setup] installing max-deeplab and its dependencies into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >&2
  .venv/bin/python -m pip install --quiet -e '.[dev]' >&2
  touch "$stamp"
fi
