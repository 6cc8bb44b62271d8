#!/usr/bin/env bash
# A CPython 3.9 with the stack Slicer 5.8 ships (numpy 1.26, pydicom 2.4.4), for `make test-py39`.
#
# The interpreter is Debian 11's python3.9 (what Debian's archive ships for bullseye), fetched with apt-get into
# DEST and run from there (dpkg -x: nothing is installed on the system); where that fails, a python3.9 on PATH
# (pyenv's, for example) is used instead. Packages come from PyPI. torch's Linux wheels for 3.9 on PyPI are CUDA
# builds: torch is installed without its dependency list, plus only the NVIDIA libraries its shared objects link
# (DT_NEEDED), so that `import torch` works on a machine without a GPU; the tests run on the CPU.
#
# usage: Testing/py39/install.sh DEST        (then DEST/bin/python runs 3.9; DEST/.installed marks success)
set -euo pipefail
DEST=$(realpath -m "${1:-.py39}")
HERE=$(cd "$(dirname "$0")" && pwd)
rm -rf "$DEST"
mkdir -p "$DEST/apt/lists/partial" "$DEST/apt/cache/archives/partial" "$DEST/debs" "$DEST/root" "$DEST/bin"

interpreter=""
apt_options=(-o "Dir::Etc::SourceList=$DEST/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$DEST/apt/lists" -o Dir::State::status=/dev/null -o "Dir::Cache=$DEST/apt/cache" -o APT::Sandbox::User=root)
echo "deb http://deb.debian.org/debian bullseye main" > "$DEST/apt/sources.list"
if command -v apt-get >/dev/null && apt-get "${apt_options[@]}" -qq update \
   && (cd "$DEST/debs" && apt-get "${apt_options[@]}" -qq download python3.9-minimal libpython3.9-minimal \
       libpython3.9-stdlib python3-distutils python3-lib2to3 libssl1.1 libffi7 libmpdec3); then
  for deb in "$DEST"/debs/*.deb; do dpkg -x "$deb" "$DEST/root"; done
  interpreter="$DEST/root/usr/bin/python3.9"
  libs="$DEST/root/usr/lib/x86_64-linux-gnu"
  # the interpreter finds its standard library next to itself; the libraries it links come first on its path
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' "$libs" "$interpreter" > "$DEST/python3.9"
  chmod +x "$DEST/python3.9"
  interpreter="$DEST/python3.9"
  echo "py39: Debian 11's $("$interpreter" -c 'import sys; print(sys.version.split()[0])')"
elif fallback=$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.9*/bin/python3.9 2>/dev/null | tail -1) && [ -n "$fallback" ]; then
  interpreter=$fallback
  echo "py39: Debian's archive not reached; using $interpreter"
else
  echo "py39: no CPython 3.9 (neither Debian 11's packages nor a pyenv 3.9)" >&2
  exit 1
fi

# a virtual environment without pip (Debian's build has no ensurepip); pip from its PyPI wheel
"$interpreter" -m venv --without-pip "$DEST/venv"
if [ -n "${libs:-}" ]; then  # the venv's python needs the same library path
  mv "$DEST/venv/bin/python3.9" "$DEST/venv/bin/python3.9-bin" 2>/dev/null || true
  rm -f "$DEST/venv/bin/python" "$DEST/venv/bin/python3"
  ln -sf "$DEST/root/usr/bin/python3.9" "$DEST/venv/bin/python3.9-bin"
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' "$libs" "$DEST/venv/bin/python3.9-bin" > "$DEST/venv/bin/python"
  chmod +x "$DEST/venv/bin/python"
fi
PY="$DEST/venv/bin/python"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.9 -d "$DEST/pip" "pip<25"
"$PY" "$(ls "$DEST"/pip/pip-*.whl)/pip" install --quiet --no-index "$(ls "$DEST"/pip/pip-*.whl)"
export PIP_CONSTRAINT="" PIP_CONFIG_FILE=/dev/null  # PyPI alone: a local pip set-up is for the main environment's Python
"$PY" -m pip install --quiet --prefer-binary -r "$HERE/requirements.txt"  # docopt (pykwalify's) is an sdist
"$PY" -m pip install --quiet --only-binary=:all: --no-deps -r "$HERE/requirements-torch.txt"
"$PY" -m pip install --quiet --only-binary=:all: "slicer-core>=5.8" || echo "py39: slicer-core does not install here; its tests skip"
"$PY" - <<'PYEOF'
import sys, numpy, pydicom, SimpleITK, torch, torchvision, radiomics, scipy, skimage
assert sys.version_info[:2] == (3, 9), sys.version
assert numpy.__version__.startswith("1.26") and pydicom.__version__ == "2.4.4", (numpy.__version__, pydicom.__version__)
assert torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3)).item() == 9.0
print(f"py39: Python {sys.version.split()[0]}, numpy {numpy.__version__}, pydicom {pydicom.__version__}, "
      f"SimpleITK {SimpleITK.Version_VersionString()}, torch {torch.__version__}, pyradiomics {radiomics.__version__}")
PYEOF
ln -sf "$PY" "$DEST/bin/python"
rm -rf "$DEST/debs" "$DEST/apt" "$DEST/pip"
touch "$DEST/.installed"
