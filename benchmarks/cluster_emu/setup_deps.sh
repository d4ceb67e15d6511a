#!/bin/sh
# Install what the emulated cluster needs; safe to run again (installs only what is missing).
#   Debian packages: fuse3 libfuse3-dev (FUSE mount + libfuse3.so for mfusepy),
#                    iproute2 (ip netns, tc), iputils-ping (link checks)
#   PyPI (into the venv): mfusepy (ctypes binding of libfuse3); fastsafetensors (optional loader,
#                         not with --required: the test suite's emulated load does not use it)
# Usage: benchmarks/cluster_emu/setup_deps.sh [--required] [PYTHON]
#        (PYTHON default: .venv/bin/python, else python3)
set -eu
ROOT=$(CDPATH= cd -- "$(dirname -- "$0")/../.." && pwd)
OPTIONAL=1
if [ "${1:-}" = "--required" ]; then OPTIONAL=0; shift; fi
PY=${1:-}
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "setup_deps.sh: needs root (apt-get; the emulation itself needs root too)" >&2
    exit 2
fi
missing=""
for pkg in fuse3 libfuse3-dev iproute2 iputils-ping; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
"$PY" -c "import mfusepy" 2>/dev/null || "$PY" -m pip install -q "mfusepy>=3"  # pyproject extra "emu"
if [ "$OPTIONAL" = 1 ]; then
    "$PY" -c "import fastsafetensors" 2>/dev/null || "$PY" -m pip install -q fastsafetensors \
        || echo "setup_deps.sh: fastsafetensors not installed; the sweep will skip it" >&2
fi
echo "cluster_emu dependencies: ok"
