#!/usr/bin/env bash
# Creates (once) the virtual environment with the official `openai` client that
# tests/openai_client.rs drives `nibble serve` with: $1 is its folder.
set -euo pipefail
venv="$1"
here="$(cd "$(dirname "$0")" && pwd)"
stamp="$venv/.requirements"
if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$stamp" "$here/requirements.txt"; then
    exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
cp "$here/requirements.txt" "$stamp"
