#!/usr/bin/env bash
# Runs every test: formatting, lints, unit + integration tests, and the
# end-to-end tests that drive the real `claude` and `codex` CLIs against
# local mock model servers. Installs what it needs by itself: the pinned
# CLIs from the npm registry go to a cache outside the repo
# ($REPLICAS_E2E_CACHE, default ~/.cache/replicas-engine-e2e).
set -euo pipefail
cd "$(dirname "$0")/.."

CLAUDE_CODE_VERSION=2.1.197
CODEX_VERSION=0.169.0
cache="${REPLICAS_E2E_CACHE:-$HOME/.cache/replicas-engine-e2e}"
prefix="$cache/npm-claude-$CLAUDE_CODE_VERSION-codex-$CODEX_VERSION"

if [ ! -x "$prefix/node_modules/.bin/claude" ] || [ ! -x "$prefix/node_modules/.bin/codex" ]; then
  echo "==> installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION and @openai/codex@$CODEX_VERSION into $prefix"
  mkdir -p "$prefix"
  npm install --silent --no-audit --no-fund --prefix "$prefix" \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" "@openai/codex@$CODEX_VERSION"
fi
export REPLICAS_E2E_CLAUDE_BIN="$prefix/node_modules/.bin/claude"
export REPLICAS_E2E_CODEX_BIN="$prefix/node_modules/.bin/codex"
"$REPLICAS_E2E_CLAUDE_BIN" --version
"$REPLICAS_E2E_CODEX_BIN" --version

echo "==> cargo fmt --check"
cargo fmt --check
echo "==> cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
# The end-to-end tests and the systemd unit check are #[ignore]d (a plain
# `cargo test` lists them as ignored); here they run too.
skip=()
if ! command -v systemd-analyze >/dev/null; then
  echo "==> SKIPPING systemd_unit_passes_systemd_analyze_verify: systemd-analyze is not installed (apt-get install systemd)"
  skip=(--skip systemd_unit_passes_systemd_analyze_verify)
fi
echo "==> cargo test (including ignored: end-to-end, systemd unit)"
cargo test --all-targets --locked -- --include-ignored ${skip[@]+"${skip[@]}"}
