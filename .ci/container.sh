#!/usr/bin/env bash
# The container image of deploy/container and the Kubernetes manifests of deploy/kubernetes,
# tested without a registry or a cluster:
# 1. the image builds from a Debian root file system (deploy/container/build.sh) and the fapm in
#    it is the one given;
# 2. in the image, fixtures/sharded pruned in parts (--part 1/3..3/3, and --part auto/3 with
#    JOB_COMPLETION_INDEX set as in a Kubernetes indexed job) and merged gives the bytes of one
#    prune;
# 3. the manifests validate against the Kubernetes API's schemas (kubernetes-validate, strict)
#    and name the image that build.sh builds;
# 4. their Jobs, run as their pods would run (.ci/kube_pods.py) on a fresh volume: every index
#    of prune.yaml, then merge.yaml, give the bytes of one prune with the same options;
# 5. with one index missing (its pod failed for good) and another run twice (a retry): merge.yaml
#    fails naming the missing part, part.yaml runs it, and merge.yaml then gives the same bytes.
#
# Needs root on Debian: installs podman and debootstrap when missing (.ci/packages.sh) and the
# Python side into the repository's venv (.ci/venv.sh). FAPM=path/to/fapm is the binary put in
# the image (tests/all.sh: the one `cargo test` built), otherwise `cargo build --profile test`
# builds one. The root file system is kept between runs (build.sh: /var/cache/fapm-container), so
# a warm run takes seconds. Ends with "container: P passed, F failed".
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
passed=0
work=

# shellcheck source=.ci/lib.sh
. "$repo/.ci/lib.sh"

finish() {
    local status=$?
    trap - EXIT
    # Containers run with --rm; only the scratch volume is left.
    [ -n "$work" ] && rm -rf "$work"
    echo "container: $passed passed, $((status == 0 ? 0 : 1)) failed"
    exit "$status"
}
trap finish EXIT

# ---- packages
t=$(now)
bash .ci/packages.sh container
python=$(bash .ci/venv.sh | tail -n 1)
echo "container: packages ready in $(since "$t") s ($(podman --version))"

# ---- fapm
t=$(now)
find_fapm
echo "container: fapm ready in $(since "$t") s ($FAPM)"

# ---- 1. the image
t=$(now)
image=$(bash deploy/container/build.sh "$FAPM" | tail -n 1)
version=$("$FAPM" --version)
# How podman can run a container here: its defaults first; then, where they fail, what made them
# work on the CI machine (deploy/container/README.md, "Tested"): the machine's own nofile and
# nproc limits (podman asks for 1048576, which root without CAP_SYS_RESOURCE cannot set; podman
# lowers its own nproc to 32768 first), and runc for crun, which refuses hybrid cgroups. Each way
# that fails is printed with its error.
cap() { # LIMIT MAX: the smaller
    if [ "$1" = unlimited ] || [ "$1" -gt "$2" ]; then echo "$2"; else echo "$1"; fi
}
nofile=$(cap "$(ulimit -Hn)" 1048576)
nproc=$(cap "$(ulimit -Hu)" 32768)
limits="--ulimit nofile=$nofile:$nofile --ulimit nproc=$nproc:$nproc"
podman_run=
for way in "podman run" "podman run $limits" "podman --runtime runc run $limits"; do
    # shellcheck disable=SC2086 # $way is words
    if err=$($way --rm --pull=never --network=none "$image" true 2>&1); then
        podman_run=$way
        break
    fi
    echo "container: '$way' cannot run a container here: $err"
done
[ -n "$podman_run" ] || fail "podman cannot run a container on this machine (above)"
echo "container: containers run with '$podman_run'"
in_image() { # ENV=VALUE... -- COMMAND...: runs COMMAND in the image, with $work as /data
    local env=()
    while [ "$1" != -- ]; do
        env+=(--env "$1")
        shift
    done
    shift
    # shellcheck disable=SC2086 # $podman_run is words
    $podman_run --rm --pull=never --network=none --volume "$work:/data" "${env[@]}" "$image" "$@"
}
work=$(mktemp -d)
got=$(in_image -- fapm --version) || fail "fapm does not run in $image"
[ "$got" = "$version" ] || fail "the image's fapm says '$got', the binary given '$version'"
size=$(podman image inspect --format '{{.Size}}' "$image")
echo "container: image $image built in $(since "$t") s ($((size / 1000000)) MB; $got)"
passed=$((passed + 1))

# ---- 2. prune in parts and merge, in the image
t=$(now)
cp -r fixtures/sharded/base fixtures/sharded/finetuned "$work/"
options=(--sparsity 0.8 --metric fapm --quiet)
"$FAPM" prune --base "$work/base" --finetuned "$work/finetuned" --output "$work/one.fapm" "${options[@]}"
mkdir "$work/parts" "$work/auto"
for i in 1 2 3; do
    in_image -- fapm prune --base /data/base --finetuned /data/finetuned --part "$i/3" \
        --output "/data/parts/part-$i.fapm" "${options[@]}"
    in_image "JOB_COMPLETION_INDEX=$((i - 1))" -- fapm prune --base /data/base \
        --finetuned /data/finetuned --part auto/3 --output "/data/auto/part-$((i - 1)).fapm" "${options[@]}"
done
in_image -- sh -c 'exec fapm merge /data/parts/part-*.fapm --output /data/merged.fapm'
in_image -- sh -c 'exec fapm merge /data/auto/part-*.fapm --output /data/merged-auto.fapm'
cmp "$work/one.fapm" "$work/merged.fapm" || fail "merge of --part I/3 in the image differs from one prune"
cmp "$work/one.fapm" "$work/merged-auto.fapm" || fail "merge of --part auto/3 in the image differs from one prune"
cmp "$work/parts/part-2.fapm" "$work/auto/part-1.fapm" || fail "--part 2/3 and auto/3 with index 1 differ"
echo "container: 3 parts (I/3 and auto/3) and merges in the image, same bytes as one prune, in $(since "$t") s"
passed=$((passed + 1))

# ---- 3. the manifests against the schemas, and their image
t=$(now)
"$python" -m kubernetes_validate --strict deploy/kubernetes/*.yaml
"$python" -m kubernetes_validate --strict --kubernetes-version 1.29 deploy/kubernetes/*.yaml
images=$(grep -h 'image:' deploy/kubernetes/*.yaml | sed -E 's/.*image: *([^ #]+).*/\1/' | sort -u)
[ "$images" = "$image" ] || fail "the manifests name $(echo "$images" | paste -sd ' '), build.sh builds $image"
echo "container: manifests valid (Kubernetes $("$python" -m kubernetes_validate --version 2>&1 | tail -n 1) schemas, and 1.29), image $image"
passed=$((passed + 1))

# ---- 4. the Jobs on a fresh volume
# prune.yaml's options but --part, --output and --threads, for the one prune to compare with.
t=$(now)
pods() { "$python" .ci/kube_pods.py --podman "$podman_run" --image "$image" --data "$work/volume" job "$@"; }
one_prune_options=$("$python" - deploy/kubernetes/prune.yaml <<'EOF'
import sys, yaml
job = yaml.safe_load(open(sys.argv[1]))
argv = job["spec"]["template"]["spec"]["containers"][0]["command"]
assert argv[:2] == ["fapm", "prune"], argv
print("\n".join(a for a in argv[2:] if not a.startswith(("--part=", "--output=", "--threads="))))
EOF
)
mapfile -t one_prune_options <<<"$one_prune_options"
fresh_volume() {
    rm -rf "$work/volume"
    mkdir "$work/volume"
    cp -r fixtures/sharded/base fixtures/sharded/finetuned "$work/volume/"
}
fresh_volume
in_image -- fapm prune "${one_prune_options[@]}" --output /data/one-k8s.fapm --quiet
pods deploy/kubernetes/prune.yaml
pods deploy/kubernetes/merge.yaml
cmp "$work/one-k8s.fapm" "$work/volume/delta.fapm" || fail "prune.yaml + merge.yaml differ from one prune"
echo "container: prune.yaml (4 indexes) + merge.yaml on a fresh volume, same bytes as one prune, in $(since "$t") s"
passed=$((passed + 1))

# ---- 5. an index never completes; part.yaml runs it again
# Index 2 does not run (its pod failed for good: Kubernetes' retries are its controller's, not
# modelled here); index 1 runs twice (a retried pod finds its part there: --overwrite).
t=$(now)
fresh_volume
pods deploy/kubernetes/prune.yaml --index 0 --index 1 --index 3
cp "$work/volume/parts/part-1.fapm" "$work/part-1.fapm"
pods deploy/kubernetes/prune.yaml --index 1
cmp "$work/part-1.fapm" "$work/volume/parts/part-1.fapm" || fail "index 1 run again wrote other bytes"
rc=0
pods deploy/kubernetes/merge.yaml >"$work/merge.out" 2>&1 || rc=$?
cat "$work/merge.out"
[ "$rc" -eq 1 ] || fail "merge.yaml without part 3: exit $rc, expected 1"
[ ! -e "$work/volume/delta.fapm" ] || fail "the refused merge left delta.fapm behind"
grep -E 'error: .*part 3 of 4 is missing' "$work/merge.out" >/dev/null || fail "merge's error does not name part 3"
pods deploy/kubernetes/part.yaml
pods deploy/kubernetes/merge.yaml
cmp "$work/one-k8s.fapm" "$work/volume/delta.fapm" || fail "the merge after part.yaml differs from one prune"
# Applied again (--overwrite), the merge gives the same delta.
pods deploy/kubernetes/merge.yaml
cmp "$work/one-k8s.fapm" "$work/volume/delta.fapm" || fail "merge.yaml applied again differs from one prune"
echo "container: without index 2, merge.yaml named part 3; part.yaml, then merge.yaml (twice), gave the same bytes, in $(since "$t") s"
passed=$((passed + 1))

# ---- 6. deploy/kubernetes/wait.sh returns on Complete or on Failed, and not before
# kubectl here is a stand-in that answers each `get job` with the next line of a list of states.
t=$(now)
mkdir "$work/bin"
cat >"$work/bin/kubectl" <<'KUBECTL'
#!/bin/sh
case "$*" in "get pods"*) echo "(the Job's pods)"; exit 0 ;; esac
n=$(($(cat "$KUBECTL_LOOKS") + 1))
echo "$n" >"$KUBECTL_LOOKS"
state=$(sed -n "${n}p" "$KUBECTL_STATES")
[ "$state" != gone ] || { echo 'Error from server (NotFound): jobs.batch "x" not found' >&2; exit 1; }
printf '%s' "$state"
KUBECTL
chmod +x "$work/bin/kubectl"
wait_case() { # EXPECTED_EXIT EXPECTED_LOOKS STATE...: wait.sh on a Job going through STATEs
    local want=$1 looks=$2 rc=0
    shift 2
    printf '%s\n' "$@" >"$work/states"
    echo 0 >"$work/looks"
    KUBECTL_STATES=$work/states KUBECTL_LOOKS=$work/looks PATH=$work/bin:$PATH \
        bash deploy/kubernetes/wait.sh fapm-prune 0 >/dev/null 2>&1 || rc=$?
    if [ "$rc" -ne "$want" ] || [ "$(cat "$work/looks")" -ne "$looks" ]; then
        fail "wait.sh through '$*': exit $rc after $(cat "$work/looks") looks, expected $want after $looks"
    fi
}
wait_case 0 3 "" "SuccessCriteriaMet" "SuccessCriteriaMet Complete"
wait_case 1 3 "" "FailureTarget" "FailureTarget Failed"
wait_case 1 1 "Failed"
wait_case 2 2 "" gone
echo "container: deploy/kubernetes/wait.sh returns on Complete (0), Failed (1) and a missing Job (2), in $(since "$t") s"
passed=$((passed + 1))
