#!/usr/bin/env bash
# Install what fastibd needs on a Debian/Ubuntu machine: the system libraries FFCV builds
# against, a virtualenv (.venv by default) and the package with its dev tools.
# Quick when nothing changed: it only re-installs after pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3 || true)}
STAMP="$VENV/.fastibd-installed"

if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: fastibd needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi

# System packages: FFCV compiles against libjpeg-turbo and OpenCV found by pkg-config.
packages=(pkg-config libturbojpeg0-dev libopencv-dev)
command -v g++ >/dev/null || packages+=(g++)
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
[ -f "$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
    || packages+=(python3-dev)
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "setup: installing system packages: ${missing[*]}"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi

want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0  # already installed for this pyproject.toml
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "setup: installing fastibd and its dependencies into $VENV (first time: a few minutes)"
"$VENV/bin/python" -m pip install -q -e '.[dev]'
echo "$want" > "$STAMP"
