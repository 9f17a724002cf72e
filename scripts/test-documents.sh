#!/usr/bin/env bash
# Debian packages whose documents the ingest tests read (skipped where apt-get is not available).
set -euo pipefail
PACKAGES=(libtasn1-doc bzip2-doc git)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
