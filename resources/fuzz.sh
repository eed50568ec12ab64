#!/usr/bin/env bash
# fuzz.sh: runs each cargo-fuzz target in fuzz/ (libFuzzer, nightly toolchain) for a while,
# from its committed seed corpus, with time, RSS and malloc limits, so that a hang, a huge
# allocation or a panic is a failure.
#   resources/fuzz.sh [SECONDS per target, default 30] [TARGET...]
# Installs cargo-fuzz (cargo install cargo-fuzz --locked) if it is missing. Findings land in
# fuzz/artifacts/TARGET/; the corpus grows in a scratch copy, not in fuzz/corpus.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

secs=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(mmio_devices storefs_requests kernel_loader pio_devices local_net)

skip() {
  echo "fuzz: skipped: $*"
  if [ "${CI:-}" = true ]; then exit 1; fi
  exit 0
}
rustup toolchain list 2>/dev/null | grep -q '^nightly' || skip "no nightly toolchain (rustup toolchain install nightly)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)" >&2
  cargo install cargo-fuzz --locked --quiet
fi

cd fuzz
cargo +nightly fuzz build -O >/dev/null
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$scratch/$t" "artifacts/$t"
  cp corpus/"$t"/seed-* "$scratch/$t/"
  log="$scratch/$t.log"
  if cargo +nightly fuzz run "$t" -O "$scratch/$t" -- -max_total_time="$secs" -timeout=10 \
    -rss_limit_mb=2048 -malloc_limit_mb=512 -print_final_stats=1 >"$log" 2>&1; then
    echo "fuzz: $t ok: $(grep -m1 -E '^Done [0-9]+ runs' "$log"), $(grep -o 'cov: [0-9]*' "$log" | tail -1)"
  else
    echo "fuzz: $t FAILED (artifacts in fuzz/artifacts/$t):"
    grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$log" | head -20
    failed+=("$t")
  fi
done
echo "fuzz: $(( ${#targets[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed"
[ ${#failed[@]} -eq 0 ]
