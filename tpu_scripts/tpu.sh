#!/usr/bin/env bash
# Cloud TPU VMs and pod slices for laserjax. Thin wrapper around tpu.py (standard library only);
# `tpu_scripts/tpu.sh --help` lists the verbs, `tpu_scripts/tpu.sh VERB --help` their flags.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "${BASH_SOURCE[0]}")/tpu.py" "$@"
