# shellcheck shell=bash
# Sourced by the CI parts: timing, failing with one message and finding the binary (the parts
# that run it, .ci/slurm.sh and .ci/container.sh: `find_fapm` needs `repo`, the repository's
# root), and the phase argument of the parts tests/all.sh runs in two steps (.ci/python.sh,
# .ci/fuzz.sh).

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

# phase_of FIRST SECOND "$@": sets `phase` to the script's argument, FIRST or SECOND (its two
# steps), or `all` (the default: both); anything else is a usage error.
phase_of() {
    phase=${3:-all}
    case $phase in
    all | "$1" | "$2") ;;
    *)
        echo "usage: $0 [$1|$2]" >&2
        exit 2
        ;;
    esac
}
