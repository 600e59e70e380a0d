"""A rendered Kubernetes pod's container as a `docker run` command line.

What a kubelet would do with the parts the worker depends on: image, command, args,
env, resource limits, the security context (user, privilege escalation, capabilities).
"""

from __future__ import annotations

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL_SUFFIXES = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def memory_bytes(quantity: str) -> int:
    for table in (_BINARY_SUFFIXES, _DECIMAL_SUFFIXES):
        for suffix, factor in table.items():
            if quantity.endswith(suffix):
                return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


def cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def docker_run_args(manifest: dict, *, name: str, gpus: bool, extra: tuple[str, ...] = ()) -> list[str]:
    """``docker run`` arguments (after ``run``) for the pod's single container.

    ``gpus=False`` leaves out an ``nvidia.com/gpu`` limit, on a machine without NVIDIA's
    container runtime; everything else is kept. ``extra``: what the cluster adds around
    the pod (volumes, network, the service account's credentials).
    """
    spec = manifest["spec"]
    (container,) = spec["containers"]
    pod_sc, sc = spec.get("securityContext", {}), container.get("securityContext", {})
    args = ["--name", name, "--detach"]
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    if user is not None:
        args += ["--user", f"{user}:{group}" if group is not None else str(user)]
    if sc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in sc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", str(memory_bytes(limits["memory"]))]
    if "cpu" in limits:
        args += ["--cpus", str(cpus(limits["cpu"]))]
    if gpus and "nvidia.com/gpu" in limits:
        args += ["--gpus", str(limits["nvidia.com/gpu"])]
    for var in container.get("env", []):
        args += ["--env", f"{var['name']}={var['value']}"]
    command = container.get("command", [])
    if command:
        args += ["--entrypoint", command[0]]
    return [*args, *extra, container["image"], *command[1:], *container.get("args", [])]
