#!/usr/bin/env bash
# The README's first command: set everything up, then ask the bundled sample a question.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/salachat ask assets/sample.pdf "Who kept the light for thirty-one years?"
