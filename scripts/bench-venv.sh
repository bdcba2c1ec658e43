# Sourced by the benchmark scripts (from the repository root): the pinned Python side of the
# side-by-side benchmarks, in a venv of its own under target/ (reinstalled when
# scripts/requirements-bench.txt changes). Sets `py` to its interpreter.
venv=target/bench-venv
if [ ! -x "$venv/bin/python" ] || ! cmp -s scripts/requirements-bench.txt "$venv/requirements-bench.txt"; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r scripts/requirements-bench.txt
  cp scripts/requirements-bench.txt "$venv/requirements-bench.txt"
fi
py="$PWD/$venv/bin/python"
