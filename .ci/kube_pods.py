"""Runs the Jobs of deploy/kubernetes as their pods would run, without a cluster.

For each pod: the init containers, then the container, each as its own `podman run` of the
manifest's image, with the volume `data` (the claim of pvc.yaml) a scratch directory, the
environment Kubernetes gives it (the declared `env`, Downward API `resourceFieldRef` values
worked out from the container's resources as the kubelet does, and JOB_COMPLETION_INDEX in an
Indexed Job) and `command` + `args` expanded as Kubernetes expands them: `$(VAR)` of a variable
the container has, `$$` for `$`, anything else kept as written. CPU and memory limits become
podman's --cpus and --memory (the CPU limit capped at this machine's cores). What it does not
model is said in deploy/kubernetes/README.md; a manifest that uses anything else (a field
reference, a working directory, another volume...) is refused here, so that the check is never
quietly partial.

    kube_pods.py [--podman 'podman run ...'] --image IMAGE --data DIR job MANIFEST [--index K]...

runs the Job's pods (an Indexed Job: every index in turn, or those given), each container with
`--podman` (how .ci/container.sh found podman can run a container here; default `podman run`).

Prints one line per container run; exits 1 when a container exits non-zero (the lines say
which), 2 when a manifest is outside what it models.
"""

from __future__ import annotations

import argparse
import decimal
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Callable, Dict, List, Optional

import yaml

CLAIM = "fapm-data"
PODMAN_RUN = "podman run"


class Unsupported(Exception):
    """A manifest uses something this runner does not model."""


# ---- Kubernetes' expansion of $(VAR) (k8s.io/kubernetes third_party/forked/golang/expansion)


def expand(text: str, lookup: Callable[[str], Optional[str]]) -> str:
    """`$(NAME)` becomes NAME's value when lookup knows it, else stays `$(NAME)`; `$$` is `$`;
    a `$` before anything else, or at the end, or an unclosed `$(`, stays as written."""
    out: List[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                close = text.find(")", i + 2)
                if close >= 0:
                    name = text[i + 2 : close]
                    value = lookup(name)
                    out.append(value if value is not None else "$(" + name + ")")
                    i = close + 1
                    continue
                out.append("$(")
                i += 2
                continue
            out.append("$" + nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


# ---- quantities and the Downward API


def quantity(text: object) -> decimal.Decimal:
    """A Kubernetes quantity ("4", "500m", "1.5", "1Gi", "512M") as a number."""
    s = str(text)
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", s)
    if not m:
        raise Unsupported(f"quantity {s!r}")
    powers = {"m": (10, -3), "k": (10, 3), "M": (10, 6), "G": (10, 9), "T": (10, 12), "P": (10, 15),
              "E": (10, 18), "Ki": (2, 10), "Mi": (2, 20), "Gi": (2, 30), "Ti": (2, 40), "Pi": (2, 50),
              "Ei": (2, 60)}
    base, exponent = powers.get(m.group(2) or "", (10, 0))
    return decimal.Decimal(m.group(1)) * decimal.Decimal(base) ** exponent


def resource_field(container: dict, ref: dict, node_cpus: int, node_memory: int) -> str:
    """The kubelet's value for a resourceFieldRef: the container's limit or request divided by
    the divisor, rounded up (an unset limit is the node's allocatable amount)."""
    if ref.get("containerName", container["name"]) != container["name"]:
        raise Unsupported("a resourceFieldRef to another container")
    resource = ref["resource"]
    kind, _, what = resource.partition(".")
    if kind not in ("limits", "requests") or what not in ("cpu", "memory"):
        raise Unsupported(f"resourceFieldRef {resource}")
    resources = container.get("resources", {})
    value = resources.get(kind, {}).get(what)
    if value is None and kind == "requests":
        value = resources.get("limits", {}).get(what)  # a request defaults to the limit
    if value is None:
        amount = decimal.Decimal(node_cpus if what == "cpu" else node_memory)
    else:
        amount = quantity(value)
    divisor = quantity(ref.get("divisor", "1"))
    return str(math.ceil(amount / divisor))


def environment(container: dict, index: Optional[int], node_cpus: int, node_memory: int) -> Dict[str, str]:
    """The variables the container starts with, in Kubernetes' order: the Job's index, then
    `env` in order, each value expanded with those before it."""
    env: Dict[str, str] = {}
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = str(index)
    if container.get("envFrom"):
        raise Unsupported("envFrom")
    for var in container.get("env", []):
        name = var["name"]
        if "value" in var:
            env[name] = expand(str(var["value"]), env.get)
        elif "valueFrom" in var:
            source = var["valueFrom"]
            if set(source) != {"resourceFieldRef"}:
                raise Unsupported(f"env {name} from {sorted(source)}")
            env[name] = resource_field(container, source["resourceFieldRef"], node_cpus, node_memory)
        else:
            env[name] = ""
    return env


# ---- running a pod


def check_container(container: dict, image: str) -> None:
    for key in container:
        if key not in ("name", "image", "imagePullPolicy", "command", "args", "env", "resources", "volumeMounts"):
            raise Unsupported(f"container field {key}")
    if container.get("image") != image:
        raise Unsupported(f"container {container['name']}: image {container.get('image')!r}, not the built {image!r}")
    policy = container.get("imagePullPolicy")
    if policy not in ("IfNotPresent", "Never"):
        # A loaded image (kind load, ctr import) is never in a registry: kubelet must not pull.
        raise Unsupported(f"container {container['name']}: imagePullPolicy {policy!r}")
    if "command" not in container:
        raise Unsupported(f"container {container['name']}: no command (the image's CMD is fapm --help)")


def run_container(pod: dict, container: dict, index: Optional[int], image: str, data: str, label: str) -> bool:
    """Runs one container of the pod to its end; True when it exited 0."""
    check_container(container, image)
    node_cpus = os.cpu_count() or 1
    node_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    env = environment(container, index, node_cpus, node_memory)
    argv = [expand(str(a), env.get) for a in container["command"] + container.get("args", [])]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    cmd = shlex.split(PODMAN_RUN) + ["--rm", "--pull=never", "--network=none"]
    for mount in container.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if volume.get("persistentVolumeClaim", {}).get("claimName") != CLAIM or set(mount) != {"name", "mountPath"}:
            raise Unsupported(f"volume mount {mount}")
        cmd += ["--volume", f"{data}:{mount['mountPath']}"]
    limits = container.get("resources", {}).get("limits", {})
    cpus = ""
    if "cpu" in limits:
        cpus = str(min(quantity(limits["cpu"]), decimal.Decimal(node_cpus)))
        cmd += ["--cpus", cpus]
    if "memory" in limits:
        cmd += ["--memory", str(int(quantity(limits["memory"])))]
    for name, value in env.items():
        cmd += ["--env", f"{name}={value}"]
    cmd += [image] + argv
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"kube: {label} {container['name']}: {shown + ' ' if shown else ''}{argv}"
          f" (cpus {cpus or 'unlimited'})", flush=True)
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in result.stdout.splitlines():
        print(f"kube:   | {line}")
    if result.returncode != 0:
        print(f"kube: {label} {container['name']}: exit {result.returncode}", flush=True)
    return result.returncode == 0


def run_pod(pod: dict, index: Optional[int], image: str, data: str, label: str) -> bool:
    """Init containers in order, each to success, then the containers (one here)."""
    for key in pod:
        if key not in ("restartPolicy", "initContainers", "containers", "volumes"):
            raise Unsupported(f"pod field {key}")
    if pod.get("restartPolicy") != "Never":
        raise Unsupported("restartPolicy other than Never")
    if len(pod["containers"]) != 1:
        raise Unsupported("a pod of more than one container")
    for container in pod.get("initContainers", []):
        if not run_container(pod, container, index, image, data, label):
            return False
    return run_container(pod, pod["containers"][0], index, image, data, label)


def run_job(manifest: str, image: str, data: str, indexes: List[int]) -> bool:
    with open(manifest) as f:
        job = yaml.safe_load(f)
    if job.get("kind") != "Job":
        raise Unsupported(f"{manifest}: kind {job.get('kind')}")
    spec = job["spec"]
    name = job["metadata"]["name"]
    pod = spec["template"]["spec"]
    if spec.get("completionMode") == "Indexed":
        todo: List[Optional[int]] = list(indexes) if indexes else list(range(spec["completions"]))
    else:
        if indexes:
            raise Unsupported(f"{manifest}: --index for a Job that is not Indexed")
        todo = [None]
    ok = True
    for index in todo:
        label = name if index is None else f"{name}[{index}]"
        ok = run_pod(pod, index, image, data, label) and ok
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True)
    parser.add_argument("--podman", default="podman run", help="how to run a container here (.ci/container.sh)")
    parser.add_argument("--data", required=True, help="the directory that stands for the volume")
    sub = parser.add_subparsers(dest="what", required=True)
    job = sub.add_parser("job")
    job.add_argument("manifest")
    job.add_argument("--index", type=int, action="append", default=[])
    args = parser.parse_args()
    global PODMAN_RUN
    PODMAN_RUN = args.podman
    try:
        ok = run_job(args.manifest, args.image, os.path.abspath(args.data), args.index)
    except Unsupported as e:
        print(f"kube: error: not modelled here: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
