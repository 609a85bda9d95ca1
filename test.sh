#!/usr/bin/env bash
# Runs every pflex test on a fresh Debian machine (as root): installs the real NBD clients and
# tools the tests drive when they are missing, then the Rust test suite (unit tests and
# end-to-end tests spawning the real binaries), then the kernel-NBD tests in a QEMU guest.
set -euo pipefail
cd "$(dirname "$0")"

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have fio || need+=(fio)
have nbdinfo || need+=(libnbd-bin)
have nbdfuse || need+=(libnbd-bin)
have nbdkit || need+=(nbdkit)
have mkfs.ext4 || need+=(e2fsprogs)
have fusermount3 || need+=(fuse3)
have qemu-io || need+=(qemu-utils)
have losetup || need+=(mount)
have ip || need+=(iproute2)
have ss || need+=(iproute2)
if ((${#need[@]})); then
  echo "test.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

start=$(date +%s)
# Every test runs: a tool missing after the install above fails the run instead of skipping.
export PFLEX_REQUIRE_TOOLS=1
echo "test.sh: cargo fmt --check, cargo clippy (-D warnings)"
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
echo "test.sh: cargo test --workspace"
cargo build --workspace --bins
cargo test --workspace -- --test-threads="${PFLEX_TEST_THREADS:-2}"
rust_secs=$(( $(date +%s) - start ))

if [ -x vm-images/run-tests.sh ]; then
  echo "test.sh: vm-images/run-tests.sh"
  PFLEX_CARGO_PROFILE="${PFLEX_CARGO_PROFILE:-debug}" vm-images/run-tests.sh
fi
echo "test.sh: all tests passed (rust ${rust_secs}s, total $(( $(date +%s) - start ))s)"
