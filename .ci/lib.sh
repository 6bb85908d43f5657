# shellcheck shell=bash
# Sourced by the CI parts that run the fapm binary (.ci/slurm.sh, .ci/container.sh): timing,
# failing with one message, and finding the binary. Needs `repo` (the repository's root).

now() { date +%s.%N; }
# Seconds since a time taken with `now`, to a tenth.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

fail() {
    echo "error: $*" >&2
    exit 1
}

# Sets FAPM to an absolute path: $FAPM as given (tests/all.sh: the binary `cargo test` built),
# or else the test profile's build, made here.
find_fapm() {
    if [ -z "${FAPM:-}" ]; then
        cargo build --quiet --profile test --bin fapm
        FAPM=${CARGO_TARGET_DIR:-$repo/target}/debug/fapm
    fi
    FAPM=$(realpath "$FAPM")
    [ -x "$FAPM" ] || fail "$FAPM is not an executable"
}
