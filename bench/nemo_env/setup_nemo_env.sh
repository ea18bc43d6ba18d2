#!/usr/bin/env bash
# Builds a NeMo 3.0.0 reference venv (about 8 GB) from the package registry, offline-capable afterwards; the
# NeMo parity checks use it (NEMO_PYTHON=<venv>/bin/python pytest tests/test_nemo_parity.py, and
# bench/salm_step.py --nemo-python). It is never a dependency of this project. nemo-toolkit is installed without
# its dependency tree; the pinned set in nemo-requirements.txt is what was shown to build and run speechlm2 on CPU.
#
#   bash bench/nemo_env/setup_nemo_env.sh [VENV_DIR]      # default /tmp/nemoenv
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-/tmp/nemoenv}
python3 -m venv "$venv"
"$venv/bin/pip" install -q -r "$here/nemo-requirements.txt"
"$venv/bin/pip" install -q --no-deps nemo-toolkit==3.0.0
"$venv/bin/python" -c "from nemo.collections.speechlm2.models import SALM; print('nemo SALM importable')"
