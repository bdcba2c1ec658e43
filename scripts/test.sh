#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): formatting, lints, then every unit
# and end-to-end test in release mode. It starts by itself every real component the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo fmt --all -- --check
cargo clippy --all-targets --release -- -D warnings
cargo test --release
