#!/usr/bin/env bash
# The whole test suite: installs what the tests need (idempotent), then runs every test.
# This is the README's test command and exactly what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
# Each test process builds what it needs once; keep slow artifacts (Linux builds) cached.
mkdir -p "$HOME/.cache/previrt"
cargo build --workspace --all-targets
cargo nextest run --workspace --no-fail-fast "$@"
