#!/usr/bin/env bash
# Set up gendd on a fresh Debian machine: the Fashion-MNIST package, chromium, a venv, CPU torch first, then gendd.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
# Debian packages: the dataset, and chromium (headless; the HTML report test renders `gendd report` pages).
APT=""
[ -d /usr/share/datasets/fashion-mnist ] || APT="$APT dataset-fashion-mnist"
command -v chromium >/dev/null 2>&1 || APT="$APT chromium"
if [ -n "$APT" ]; then
  $SUDO apt-get install -y -q $APT >/dev/null 2>&1 || \
    { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $APT >/dev/null; }
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v -i "warning" || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i "warning" || true
python -m pip install -q -e ".[test]" 2>&1 | grep -v -i "warning" || true
python -c "import gendd, torch, diffusers; print('gendd', gendd.__version__, '| torch', torch.__version__, '| diffusers', diffusers.__version__)"
