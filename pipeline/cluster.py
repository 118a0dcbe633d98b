"""The GPU cluster: checks on cluster.yaml before any node is paid for, and the head node's MLflow server.

``check_cluster_config`` validates a Ray cluster-launcher config offline: Ray's own JSON schema (shipped in
the Ray wheel) plus this project's rules, which the schema cannot express: GPU node types declare the GPUs
their instance type has, the image is the Ray release installed here, nothing binds a public or wildcard
address, no secret sits in the file, token auth is on, the project is installed on every node, and MLflow
runs on the head with a database backend and S3 artifacts.

``start_mlflow_server`` is what cluster.yaml runs on the head (``vitpipe cluster mlflow-server``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path

import yaml

# NVIDIA GPUs per AWS instance type, with the model name Ray reports as `accelerator_type:<model>`.
_SIZES_1_4_8 = {"xlarge": 1, "2xlarge": 1, "4xlarge": 1, "8xlarge": 1, "16xlarge": 1,
                "12xlarge": 4, "24xlarge": 4, "48xlarge": 8}
AWS_GPU_INSTANCES: dict[str, tuple[int, str]] = {
    **{f"g5.{size}": (n, "A10G") for size, n in _SIZES_1_4_8.items()},
    **{f"g6.{size}": (n, "L4") for size, n in _SIZES_1_4_8.items()},
    **{f"g6e.{size}": (n, "L40S") for size, n in _SIZES_1_4_8.items()},
    **{f"g4dn.{size}": (1, "T4") for size in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},
    "g4dn.12xlarge": (4, "T4"),
    "g4dn.metal": (8, "T4"),
    "p3.2xlarge": (1, "V100"),
    "p3.8xlarge": (4, "V100"),
    "p3.16xlarge": (8, "V100"),
    "p3dn.24xlarge": (8, "V100"),
    "p4d.24xlarge": (8, "A100"),
    "p4de.24xlarge": (8, "A100"),
    "p5.48xlarge": (8, "H100"),
    "p5e.48xlarge": (8, "H200"),
    "p5en.48xlarge": (8, "H200"),
}
# Families with accelerators; a type of these families missing from the table above cannot be checked.
AWS_GPU_FAMILIES = {t.split(".")[0] for t in AWS_GPU_INSTANCES} | {
    "p2", "g3", "g3s", "g4ad", "g5g", "p6-b200", "p6e-gb200", "inf1", "inf2", "trn1", "trn1n", "trn2", "dl1"}

_COMMAND_LISTS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                  "head_start_ray_commands", "worker_start_ray_commands")
_IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)(?:-(?P<variant>gpu|cpu|cu\d+))?$")
# A host given to a server: --host/-h (mlflow), --dashboard-host (ray), --bind/-b (gunicorn), --ip (jupyter).
_BIND = re.compile(r"(?:^|[\s'\"])(?:--host|--dashboard-host|--bind|-b|-h|--ip)(?:=|\s+)['\"]?([^\s'\";&|)]+)")
_SECRETS = [
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    (re.compile(r"(?i)\baws_secret_access_key\b\s*[:=]"), "an AWS secret access key"),
    (re.compile(r"(?i)\baws_session_token\b\s*[:=]"), "an AWS session token"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"(?i)\b(?:postgres(?:ql)?|mysql)(?:\+\w+)?://[^:/@\s]+:[^@\s]+@"), "a database password in a URI"),
    (re.compile(r"\bRAY_AUTH_TOKEN\s*[:=]"), "the Ray auth token"),
    (re.compile(r"(?i)\bMLFLOW_TRACKING_(?:PASSWORD|TOKEN)\s*[:=]"), "an MLflow credential"),
]


def ray_schema_path() -> Path:
    """Ray's cluster-config JSON schema, shipped in the Ray wheel (found without importing ray)."""
    return Path(metadata.distribution("ray").locate_file("ray/autoscaler/ray-schema.json"))


def installed_ray_version() -> str:
    return metadata.version("ray")


def check_cluster_config(path: str | os.PathLike) -> list[str]:
    """Every problem found in the cluster config at ``path``, each a sentence naming where it is; [] if none."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        return [f"cannot read it ({e.strerror})"]
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"not valid YAML ({e})"]
    if not isinstance(config, dict):
        return ["expected a mapping of cluster settings at the top level"]

    problems = _secret_problems(text)
    problems += _schema_problems(config)
    # The project's rules read values of the wrong type (which the schema has reported) as absent.
    node_types = {name: node for name, node in _dict(config.get("available_node_types")).items()
                  if isinstance(node, dict)}
    if not node_types:
        return problems + ["available_node_types: missing; declare a CPU head and GPU worker node types"]
    problems += _provider_problems(config)
    problems += _node_type_problems(config, node_types)
    problems += _image_problems(config, node_types)
    problems += _exposure_problems(config)
    problems += _auth_problems(config)
    problems += _install_problems(config)
    problems += _mlflow_problems(config)
    return problems


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _strings(value) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _secret_problems(text: str) -> list[str]:
    problems = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for pattern, what in _SECRETS:
            if pattern.search(line):
                problems.append(f"line {lineno}: {what} is written in the file; use the instance role (IAM "
                                "instance profile) or an environment variable / file on the machine instead")
    return problems


def _schema_problems(config: dict) -> list[str]:
    try:
        import jsonschema
    except ImportError:  # jsonschema comes with ray; warn rather than fail if someone removed it
        warnings.warn("jsonschema is not installed: the check against Ray's schema is skipped", stacklevel=3)
        return []
    schema = json.loads(ray_schema_path().read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(config),
                    key=lambda e: [str(part) for part in e.absolute_path])
    return [f"{'.'.join(map(str, e.absolute_path)) or '(top level)'}: {e.message} (Ray's cluster schema)"
            for e in errors]


def _provider_problems(config: dict) -> list[str]:
    provider = _dict(config.get("provider"))
    problems = []
    if provider.get("type") != "aws":
        problems.append(f"provider.type: is {provider.get('type')!r}; this config and its GPU checks are for 'aws'")
    rules = _dict(provider.get("security_group")).get("IpPermissions")
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, dict):
            problems.append(f"provider.security_group.IpPermissions[{i}]: expected a mapping (an EC2 IpPermission)")
            continue
        ranges = [_dict(r).get("CidrIp") for r in rule.get("IpRanges") or []] + [
            _dict(r).get("CidrIpv6") for r in rule.get("Ipv6Ranges") or []]
        for cidr in ranges:
            if isinstance(cidr, str) and _is_public_network(cidr):
                ports = f"{rule.get('FromPort')}-{rule.get('ToPort')}"
                problems.append(f"provider.security_group.IpPermissions[{i}]: opens ports {ports} to {cidr}; "
                                "reach the dashboard and MLflow through an SSH port-forward instead")
    return problems


def _is_public_network(cidr: str) -> bool:
    try:
        network = ipaddress.ip_network(cidr, strict=False)
    except ValueError:
        return True  # not an address we can vouch for
    return not (network.is_private or network.is_loopback)


def _node_type_problems(config: dict, node_types: dict) -> list[str]:
    problems = []
    head = config.get("head_node_type")
    if head not in node_types:
        problems.append(f"head_node_type: {head!r} is not one of available_node_types ({', '.join(node_types)})")
    gpu_worker_types = 0
    sum_min_workers = 0
    for name, node in node_types.items():
        where = f"available_node_types.{name}"
        resources = _dict(node.get("resources"))
        declared_gpus = resources.get("GPU")
        if declared_gpus is not None and (not isinstance(declared_gpus, int) or isinstance(declared_gpus, bool)):
            continue  # the schema check has said so
        instance = _dict(node.get("node_config")).get("InstanceType")
        if not isinstance(instance, str) or not instance:
            problems.append(f"{where}.node_config.InstanceType: missing")
            continue
        known = AWS_GPU_INSTANCES.get(instance)
        is_gpu_instance = known is not None or instance.split(".")[0] in AWS_GPU_FAMILIES
        if name == head:
            if is_gpu_instance or (declared_gpus or 0) > 0:
                problems.append(f"{where}: the head node must not be a GPU node ({instance}, GPU: {declared_gpus}); "
                                "it runs drivers and MLflow, GPU work goes to worker node types")
            continue
        min_w, max_w = node.get("min_workers", 0), node.get("max_workers", config.get("max_workers", 0))
        if isinstance(min_w, int) and isinstance(max_w, int):
            sum_min_workers += min_w
            if min_w > max_w:
                problems.append(f"{where}: min_workers ({min_w}) is larger than max_workers ({max_w})")
        if not is_gpu_instance:
            if (declared_gpus or 0) > 0:
                problems.append(f"{where}: declares GPU: {declared_gpus} but {instance} has no GPU")
            continue
        gpu_worker_types += 1
        if known is None:
            problems.append(f"{where}: cannot check the GPUs of {instance}; add it to "
                            "pipeline.cluster.AWS_GPU_INSTANCES")
            continue
        gpus, model = known
        if declared_gpus is None:
            problems.append(f"{where}: resources must declare its GPUs (GPU: {gpus} for {instance}) so the "
                            "autoscaler can plan GPU jobs before the node exists")
        elif declared_gpus != gpus:
            problems.append(f"{where}: declares GPU: {declared_gpus} but {instance} has {gpus} x {model}")
        for key in resources:
            if key.startswith("accelerator_type:") and key != f"accelerator_type:{model}":
                problems.append(f"{where}: declares {key} but {instance} has {model} GPUs "
                                f"(accelerator_type:{model})")
    if gpu_worker_types == 0:
        problems.append("available_node_types: no GPU worker node type")
    max_workers = config.get("max_workers")
    if isinstance(max_workers, int) and sum_min_workers > max_workers:
        problems.append(f"max_workers: {max_workers} is smaller than the node types' min_workers together "
                        f"({sum_min_workers})")
    return problems


def _image_problems(config: dict, node_types: dict) -> list[str]:
    """The image each node really runs (Ray's precedence: node type > worker_image/head_image > image)."""
    docker = _dict(config.get("docker"))
    head = config.get("head_node_type")
    def image(*candidates):
        return next((c for c in candidates if isinstance(c, str) and c), None)

    images = {}
    for name, node in node_types.items():
        if name == head:
            images[name] = image(docker.get("head_image"), docker.get("image"))
        else:
            images[name] = image(_dict(node.get("docker")).get("worker_image"), docker.get("worker_image"),
                                 docker.get("image"))
    if not any(images.values()):
        return ["docker.image: missing; run the nodes in rayproject/ray:<Ray version>-py311-gpu"]
    ray_version = installed_ray_version()
    problems, pythons = [], set()
    for name, image in images.items():
        where = f"available_node_types.{name} (image {image})"
        if image is None:
            problems.append(f"available_node_types.{name}: no docker image; set docker.image")
            continue
        if image.startswith("rayproject/ray-ml"):
            problems.append(f"{where}: rayproject/ray-ml images are no longer published; use "
                            f"rayproject/ray:{ray_version}-py311-gpu and install the project in setup_commands")
            continue
        match = _IMAGE.match(image)
        if not match:
            problems.append(f"{where}: not a rayproject/ray:<version>-py3XX-gpu image")
            continue
        pythons.add(match["py"])
        if match["ray"] != ray_version:
            problems.append(f"{where}: has Ray {match['ray']} but the project runs Ray {ray_version} "
                            f"(client and cluster must match); use rayproject/ray:{ray_version}-py{match['py']}-gpu")
        variant = match["variant"] or ""
        instance = _dict(node_types[name].get("node_config")).get("InstanceType")
        if instance in AWS_GPU_INSTANCES and not (variant == "gpu" or variant.startswith("cu")):
            problems.append(f"{where}: has no CUDA; GPU nodes need the -gpu (or -cuXXX) variant")
    if len(pythons) > 1:
        problems.append(f"docker: the images mix Python versions ({', '.join(sorted(pythons))}); every node of a "
                        "Ray cluster must run the same Python")
    return problems


def _commands(config: dict) -> list[tuple[str, str]]:
    """(where, command) for every shell command in the config, node-type overrides included."""
    found = []
    for key in _COMMAND_LISTS:
        found += [(f"{key}[{i}]", c) for i, c in enumerate(_strings(config.get(key)))]
    for name, node in _dict(config.get("available_node_types")).items():
        for key in ("initialization_commands", "worker_setup_commands"):
            found += [(f"available_node_types.{name}.{key}[{i}]", c)
                      for i, c in enumerate(_strings(_dict(node).get(key)))]
    return found


def _exposure_problems(config: dict) -> list[str]:
    problems = []
    for where, command in _commands(config):
        for value in _BIND.findall(command):
            host = _bind_host(value)
            if host.startswith("$"):
                continue  # a shell expansion: checked where it is computed, not here
            if host in ("", "*", "::", "0.0.0.0") or _is_public_host(host):
                problems.append(f"{where}: binds {value or '(all interfaces)'}; bind 127.0.0.1 (or the node's "
                                "private address) and use an SSH port-forward")
        if re.search(r"(?<![\d.])0\.0\.0\.0(?![\d.])", command) and "0.0.0.0" not in " ".join(
                _BIND.findall(command)):
            problems.append(f"{where}: mentions 0.0.0.0 (every interface); bind 127.0.0.1 instead")
    docker = _dict(config.get("docker"))
    for key in ("run_options", "head_run_options", "worker_run_options"):
        for option in _strings(docker.get(key)):
            if re.match(r"^\s*(-p|--publish|-P|--publish-all)\b", option):
                problems.append(f"docker.{key}: {option!r} publishes container ports; use SSH port-forwards")
    if not any("--dashboard-host" in c for c in _strings(config.get("head_start_ray_commands"))):
        problems.append("head_start_ray_commands: `ray start --head` must pass --dashboard-host=127.0.0.1 "
                        "(the dashboard accepts jobs: keep it on loopback, reach it with `ray dashboard`)")
    return problems


def _bind_host(value: str) -> str:
    """The host of a bind value: ``127.0.0.1``, ``127.0.0.1:80``, ``[::1]:80``, ``::1``, ``localhost``."""
    if value.startswith("["):
        return value[1:value.find("]")]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _is_public_host(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name (localhost, a variable): not a literal public address
    return address.is_global


def _auth_problems(config: dict) -> list[str]:
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in _strings(config.get(key)) if "ray start" in c]
        if not starts or not all(re.search(r"\bRAY_AUTH_MODE=token\b", c) for c in starts):
            problems.append(f"{key}: `ray start` must run with RAY_AUTH_MODE=token (Ray token auth); "
                            "without it anyone who reaches the cluster's ports can run code on it")
    if not any(str(remote).rstrip("/").endswith(".ray/auth_token") for remote in _dict(config.get("file_mounts"))):
        problems.append("file_mounts: must copy the Ray auth token to the nodes "
                        "(~/.ray/auth_token: ~/.ray/auth_token; create it with `ray get-auth-token --generate`)")
    return problems


def _install_problems(config: dict) -> list[str]:
    mounts = [str(remote).rstrip("/") for remote in _dict(config.get("file_mounts"))]
    if any("pip install" in c and any(m in c for m in mounts) for c in _strings(config.get("setup_commands"))):
        return []
    return ["setup_commands: must pip-install the project from its file_mounts copy on every node "
            "(e.g. file_mounts ~/vitpipe: . and `pip install -e ~/vitpipe`)"]


def _mlflow_problems(config: dict) -> list[str]:
    head = [c for key in ("head_setup_commands", "head_start_ray_commands") for c in _strings(config.get(key))]
    servers = [c for c in head if "mlflow-server" in c or "mlflow server" in c]
    if not servers:
        return ["head_start_ray_commands: no MLflow tracking server on the head "
                "(`vitpipe cluster mlflow-server --db ... --artifacts s3://...`)"]
    problems = []
    for command in servers:
        artifacts = re.search(r"--(?:artifacts|artifacts-destination)(?:=|\s+)(\S+)", command)
        if not artifacts or not artifacts.group(1).startswith("s3://"):
            problems.append("head_start_ray_commands: the MLflow server must keep artifacts in S3 "
                            "(--artifacts s3://BUCKET/mlflow) so they outlive the head node")
        db = re.search(r"--(?:db|backend-store-uri)(?:=|\s+)(\S+)", command)
        if not db or db.group(1).startswith(("file:", "./", "mlruns")):
            problems.append("head_start_ray_commands: the MLflow server needs a database backend "
                            "(--db on the head's disk, or a postgresql:// URI)")
    return problems


# --- the MLflow tracking server on the head node ----------------------------------------------------------


def start_mlflow_server(db: str | os.PathLike, artifacts: str, *, port: int = 5000,
                        private_address: str | None = None, state_dir: str | os.PathLike = "~/mlflow",
                        host_names: tuple[str, ...] = (), workers: int = 4, timeout_s: float = 120.0) -> int:
    """(Re)start ``mlflow server`` detached and return its process-group id once it answers on every address.

    It binds 127.0.0.1 (port-forwards, jobs on the head) and the node's private address (GPU workers on other
    nodes), never a wildcard. ``private_address`` defaults to the address Ray uses for this node;
    ``host_names`` are further names clients may call it by (cluster.yaml's ``vitpipe-head``). A server
    started earlier from the same ``state_dir`` is stopped first.
    """
    if private_address is None:
        import ray.util

        private_address = ray.util.get_node_ip_address()
    address = ipaddress.ip_address(private_address)  # ValueError names a malformed address
    if address.is_unspecified or address.is_global:
        raise ValueError(f"refusing to bind MLflow to {private_address}: not a private address")
    state_dir = Path(state_dir).expanduser()
    state_dir.mkdir(parents=True, exist_ok=True)
    stop_mlflow_server(state_dir)
    db_path = Path(db).expanduser().resolve()
    db_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mlflow", "server",
               "--backend-store-uri", f"sqlite:///{db_path}", "--artifacts-destination", artifacts,
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
               # mlflow passes one --host; gunicorn takes several binds
               "--gunicorn-opts", f"--bind {_url_host(private_address)}:{port}"]
    # Host headers the server accepts (its DNS-rebinding guard; with gunicorn only settable by environment):
    # loopback, as a port-forward arrives, and this address.
    names = ("localhost", "127.0.0.1", _url_host(private_address), *host_names)
    allowed = ",".join(f"{h},{h.replace('[', '[[]')}:*" for h in names)
    env = {**os.environ, "MLFLOW_SERVER_ALLOWED_HOSTS": allowed}
    with open(state_dir / "server.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    (state_dir / "server.pid").write_text(str(process.pid))
    urls = [f"http://127.0.0.1:{port}/health", f"http://{_url_host(private_address)}:{port}/health"]
    deadline = time.monotonic() + timeout_s
    while urls:
        if process.poll() is not None:
            tail = (state_dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mlflow server exited with code {process.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            stop_mlflow_server(state_dir)
            raise TimeoutError(f"mlflow server did not answer on {', '.join(urls)} within {timeout_s:.0f} s")
        try:
            with urllib.request.urlopen(urls[0], timeout=2) as response:
                if response.status == 200:
                    urls.pop(0)
                    continue
        except OSError:
            pass
        time.sleep(0.5)
    return process.pid


def stop_mlflow_server(state_dir: str | os.PathLike = "~/mlflow", timeout_s: float = 30.0) -> bool:
    """Stop the server recorded in ``state_dir`` (its whole process group); False if none was running."""
    pid_file = Path(state_dir).expanduser() / "server.pid"
    try:
        pgid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    pid_file.unlink()
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pgid, os.WNOHANG)  # reap it if it is our own child
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    return True


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
