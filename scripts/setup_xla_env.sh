#!/usr/bin/env bash
# Build (or reuse) the isolated TPU/XLA environment and print its python's path.
#
#   XLA_PYTHON=$(bash scripts/setup_xla_env.sh)
#   PJRT_DEVICE=CPU "$XLA_PYTHON" -m accelerate.commands.launch --config_file accelerate_configs/tpu.yaml run_mlm.py ...
#
# The venv lives outside the checkout, keyed on the content of requirements-xla.txt, so a
# change of pins builds a new one and an unchanged one is reused (seconds instead of
# minutes). A build that did not finish is never reused. Progress goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
key=$(sha256sum requirements-xla.txt | cut -c1-12)
root="${RUN_MLM_XLA_ENV_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/run_mlm}"
venv="$root/xla-env-$key"
if [ ! -f "$venv/.complete" ]; then
    start=$(date +%s)
    rm -rf "$venv"
    mkdir -p "$root"
    echo "Building the XLA environment in $venv (a few minutes the first time)..." >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r requirements-xla.txt >&2
    touch "$venv/.complete"
    echo "XLA environment built in $(( $(date +%s) - start )) s" >&2
else
    echo "Reusing the XLA environment in $venv" >&2
fi
echo "$venv/bin/python"
