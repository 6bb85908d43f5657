# shellcheck shell=bash
# Sourced by the CI parts that run the fapm binary (.ci/slurm.sh, .ci/container.sh): sets FAPM
# to an absolute path, $FAPM as given (tests/all.sh: the binary `cargo test` built) or else the
# test profile's build, made here. Needs `repo` and a `fail MESSAGE` function.
if [ -z "${FAPM:-}" ]; then
    cargo build --quiet --profile test --bin fapm
    FAPM=${CARGO_TARGET_DIR:-$repo/target}/debug/fapm
fi
FAPM=$(realpath "$FAPM")
[ -x "$FAPM" ] || fail "$FAPM is not an executable"
