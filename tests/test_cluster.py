"""cluster.yaml, checked offline: the shipped file passes, and each rule catches a broken copy by name."""

from __future__ import annotations

import copy
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.cli import main
from pipeline.cluster import AWS_GPU_INSTANCES, check_cluster_config, start_mlflow_server

REPO = Path(__file__).resolve().parents[1]
SHIPPED = yaml.safe_load((REPO / "cluster.yaml").read_text())
RAY = metadata.version("ray")


def check(config: dict, tmp_path: Path) -> list[str]:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return check_cluster_config(path)


def broken(edit) -> dict:
    config = copy.deepcopy(SHIPPED)
    edit(config)
    return config


def test_shipped_config_passes():
    assert check_cluster_config(REPO / "cluster.yaml") == []


def test_ray_loads_the_shipped_config_as_ray_up_does():
    """Ray's own preparation of a cluster config (defaults filled in, then validated), minus the AWS calls."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(SHIPPED))
    validate_config(prepared)
    # Ray prepends setup_commands to each role's own; none of its AWS defaults slip in.
    assert prepared["head_setup_commands"] == prepared["worker_setup_commands"] == SHIPPED["setup_commands"]
    assert prepared["available_node_types"]["gpu_a100_x8"]["resources"]["GPU"] == 8


def test_image_is_the_pinned_ray_release():
    """The image tag, the installed Ray and pyproject's Ray requirement agree (client and cluster must match)."""
    image = SHIPPED["docker"]["image"]
    assert image == f"rayproject/ray:{RAY}-py311-gpu"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray_requirement = next(Requirement(r) for r in pyproject["project"]["dependencies"] if r.startswith("ray"))
    assert ray_requirement.specifier.contains(RAY)
    assert {"default", "train", "tune"} <= ray_requirement.extras  # job submission needs ray[default]


def test_gpu_table_matches_the_shipped_node_types():
    """The A10G and A100 node types declare exactly their instances' GPUs (AWS: g5.12xlarge 4, p4d.24xlarge 8)."""
    assert AWS_GPU_INSTANCES["g5.12xlarge"] == (4, "A10G")
    assert AWS_GPU_INSTANCES["p4d.24xlarge"] == (8, "A100")
    types = SHIPPED["available_node_types"]
    assert types["gpu_a10g_x4"]["resources"]["GPU"] == 4
    assert types["gpu_a100_x8"]["resources"]["GPU"] == 8
    assert types[SHIPPED["head_node_type"]]["resources"]["GPU"] == 0


def _set(path: str, value):
    """An edit that sets a dotted path (list indices as integers) in the config."""
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


def _delete(path: str):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        del node[last]
    return edit


def _replace_in_commands(key: str, old: str, new: str):
    def edit(config):
        config[key] = [c.replace(old, new) for c in config[key]]
    return edit


def _append_command(key: str, command: str):
    def edit(config):
        config.setdefault(key, []).append(command)
    return edit


A10G = "available_node_types.gpu_a10g_x4"
A100 = "available_node_types.gpu_a100_x8"
HEAD = "available_node_types.head_cpu"

BROKEN = {
    # Ray's own schema
    "unknown top-level key": (_set("max_worker", 3), ["Additional properties are not allowed ('max_worker'"]),
    "resource not an integer": (_set(f"{A10G}.resources.GPU", "four"), ["'four' is not of type 'integer'"]),
    # GPUs declared as the instance has them
    "wrong GPU count": (_set(f"{A10G}.resources.GPU", 2),
                        ["gpu_a10g_x4: declares GPU: 2 but g5.12xlarge has 4 x A10G"]),
    "GPUs not declared": (_delete(f"{A100}.resources.GPU"),
                          ["gpu_a100_x8: resources must declare its GPUs (GPU: 8 for p4d.24xlarge)"]),
    "wrong accelerator type": (_set(f"{A100}.resources", {"CPU": 96, "GPU": 8, "accelerator_type:A10G": 1}),
                               ["gpu_a100_x8: declares accelerator_type:A10G but p4d.24xlarge has A100 GPUs"]),
    "GPUs on a CPU instance": (_set(f"{A10G}.node_config.InstanceType", "m5.12xlarge"),
                               ["gpu_a10g_x4: declares GPU: 4 but m5.12xlarge has no GPU"]),
    "unknown GPU size": (_set(f"{A10G}.node_config.InstanceType", "g5.3xlarge"),
                         ["gpu_a10g_x4: cannot check the GPUs of g5.3xlarge"]),
    "no instance type": (_delete(f"{A10G}.node_config.InstanceType"),
                         ["gpu_a10g_x4.node_config.InstanceType: missing"]),
    "no GPU worker type": (lambda c: [c["available_node_types"].pop(k) for k in ("gpu_a10g_x4", "gpu_a100_x8")],
                           ["available_node_types: no GPU worker node type"]),
    # the head does no GPU work
    "GPU head instance": (_set(f"{HEAD}.node_config.InstanceType", "g5.xlarge"),
                          ["head_cpu: the head node must not be a GPU node (g5.xlarge"]),
    "GPU head resources": (_set(f"{HEAD}.resources.GPU", 1), ["head_cpu: the head node must not be a GPU node"]),
    "head type missing": (_set("head_node_type", "head"), ["head_node_type: 'head' is not one of"]),
    # autoscaling bounds
    "min above max": (_set(f"{A10G}.min_workers", 5), ["gpu_a10g_x4: min_workers (5) is larger than max_workers (4)"]),
    "min workers above global max": (lambda c: (_set(f"{A10G}.min_workers", 4)(c), _set(f"{A100}.min_workers", 2)(c),
                                                _set("max_workers", 5)(c)),
                                     ["max_workers: 5 is smaller than the node types' min_workers together (6)"]),
    # the image is the Ray this project runs
    "older Ray image": (_set("docker.image", "rayproject/ray:2.59.0-py311-gpu"),
                        [f"has Ray 2.59.0 but the project runs Ray {RAY}"] * 3),
    "ray-ml image": (_set("docker.image", f"rayproject/ray-ml:{RAY}-py311-gpu"),
                     ["rayproject/ray-ml images are no longer published"] * 3),
    "CPU image on GPU nodes": (_set("docker.image", f"rayproject/ray:{RAY}-py311"),
                               ["has no CUDA; GPU nodes need the -gpu"] * 2),
    "mixed Python": (_set("docker.head_image", f"rayproject/ray:{RAY}-py310-gpu"),
                     ["the images mix Python versions (310, 311)"]),
    "not a Ray image": (_set("docker.image", "nvidia/cuda:12.4.1-runtime-ubuntu22.04"),
                        ["not a rayproject/ray:<version>-py3XX-gpu image"] * 3),
    # nothing on the internet
    "dashboard on every interface": (
        _replace_in_commands("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        ["head_start_ray_commands[2]: binds 0.0.0.0"]),
    "dashboard host not given": (
        _replace_in_commands("head_start_ray_commands", "--dashboard-host=127.0.0.1", ""),
        ["`ray start --head` must pass --dashboard-host=127.0.0.1"]),
    "dashboard on a public address": (
        _replace_in_commands("head_start_ray_commands", "--dashboard-host=127.0.0.1", "--dashboard-host=54.12.3.4"),
        ["binds 54.12.3.4"]),
    "mlflow on every interface": (
        _append_command("head_start_ray_commands", "mlflow server --host 0.0.0.0 --backend-store-uri "
                        "sqlite:////home/ray/m.db --artifacts-destination s3://b/mlflow"),
        ["head_start_ray_commands[4]: binds 0.0.0.0"]),
    "gunicorn wildcard bind": (
        _append_command("head_setup_commands", "gunicorn --bind [::]:5000 app:app"), ["binds [::]:5000"]),
    "open security group": (
        _set("provider.security_group", {"IpPermissions": [
            {"FromPort": 5000, "ToPort": 5000, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
        ["opens ports 5000-5000 to 0.0.0.0/0"]),
    "published container port": (_set("docker.run_options", ["-p 8265:8265"]), ["publishes container ports"]),
    # no secrets in the file
    "AWS keys inline": (
        _append_command("setup_commands", "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE "
                        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ["an AWS access key id is written in the file", "an AWS secret access key is written in the file"]),
    "database password": (
        _append_command("head_setup_commands", "echo postgresql://mlflow:hunter2@db.internal:5432/mlflow"),
        ["a database password in a URI is written in the file"]),
    "Ray token inline": (_replace_in_commands("worker_start_ray_commands", "RAY_AUTH_MODE=token",
                                              "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=0123abcd"),
                         ["the Ray auth token is written in the file"]),
    "private key inline": (_set("metadata", {"key": "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n"}),
                           ["a private key is written in the file"]),
    # token auth on
    "workers without token auth": (
        _replace_in_commands("worker_start_ray_commands", "RAY_AUTH_MODE=token ", ""),
        ["worker_start_ray_commands: `ray start` must run with RAY_AUTH_MODE=token"]),
    "token not shipped": (lambda c: c["file_mounts"].pop("~/.ray/auth_token"),
                          ["file_mounts: must copy the Ray auth token"]),
    # the project on every node, MLflow on the head
    "project not installed": (_set("setup_commands", ["pip install boto3 awscli"]),
                              ["setup_commands: must pip-install the project from its file_mounts copy"]),
    "no MLflow server": (lambda c: c["head_start_ray_commands"].pop(), ["no MLflow tracking server on the head"]),
    "MLflow artifacts on the head's disk": (
        _replace_in_commands("head_start_ray_commands", "--artifacts s3://$BUCKET/mlflow", "--artifacts ~/mlartifacts"),
        ["the MLflow server must keep artifacts in S3"]),
    "provider not AWS": (_set("provider.type", "gcp"), ["provider.type: is 'gcp'"]),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_rule_catches_a_broken_copy(name, tmp_path):
    edit, expected = BROKEN[name]
    problems = check(broken(edit), tmp_path)
    # Each expected fragment names as many problems as it is listed, and nothing else is reported.
    assert len(problems) == len(expected), problems
    for fragment in set(expected):
        assert sum(fragment in p for p in problems) == expected.count(fragment), problems


@pytest.mark.parametrize("path, value", [
    ("provider", "aws"), ("docker", ["rayproject/ray"]), ("docker.image", 3), ("file_mounts", ["~/vitpipe"]),
    ("setup_commands", "pip install -e ~/vitpipe"), (f"{A10G}.node_config", "g5.12xlarge"),
    (f"{A10G}.resources", [4]), (f"{A10G}", "g5.12xlarge"), ("available_node_types", None),
    ("provider.security_group", {"IpPermissions": ["tcp/22"]}), ("head_start_ray_commands", [["ray", "start"]]),
])  # fmt: skip
def test_values_of_the_wrong_type_are_reported_not_raised(path, value, tmp_path):
    problems = check(broken(_set(path, value)), tmp_path)
    assert any(p.startswith(path.split(".")[0]) for p in problems), problems  # named where it is


def test_secrets_are_not_echoed(tmp_path):
    edit, _ = BROKEN["AWS keys inline"]
    report = "\n".join(check(broken(edit), tmp_path))
    assert "AKIAIOSFODNN7EXAMPLE" not in report and "wJalrXUtnFEMI" not in report
    assert "line " in report  # where to look instead


def test_harmless_flags_are_not_bindings(tmp_path):
    """`-h` / `-b` of ordinary tools are not mistaken for servers listening on every interface."""
    config = broken(_append_command("setup_commands", "df -h && du -h ~/vitpipe | tail -1 && ls -b /tmp"))
    assert check(config, tmp_path) == []


@pytest.mark.parametrize("text, problem", [
    ("", "expected a mapping of cluster settings at the top level"),
    ("cluster_name: [unclosed", "not valid YAML"),
    ("cluster_name: x\nprovider: {type: aws}\n", "available_node_types: missing"),
])  # fmt: skip
def test_unusable_files(text, problem, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    assert any(problem in p for p in check_cluster_config(path))
    assert check_cluster_config(tmp_path / "absent.yaml") == ["cannot read it (No such file or directory)"]


def test_without_jsonschema_the_schema_check_is_skipped_loudly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # import jsonschema -> ImportError
    edit, _ = BROKEN["unknown top-level key"]
    with pytest.warns(UserWarning, match="check against Ray's schema is skipped"):
        problems = check(broken(edit), tmp_path)
    assert problems == []  # only the schema knows `max_worker` is a typo
    with pytest.warns(UserWarning):
        assert len(check(broken(BROKEN["wrong GPU count"][0]), tmp_path)) == 1  # the project's rules still run


def test_cli_check(tmp_path, capsys):
    assert main(["cluster", "check", str(REPO / "cluster.yaml")]) == 0
    assert "OK" in capsys.readouterr().out
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(broken(BROKEN["wrong GPU count"][0])))
    assert main(["cluster", "check", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"{path}: available_node_types.gpu_a10g_x4: declares GPU: 2 but g5.12xlarge has 4 x A10G" in captured.out
    assert "1 problem(s)" in captured.err


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "8.8.8.8", "not-an-ip"])
def test_mlflow_server_refuses_public_or_wildcard_addresses(address, tmp_path):
    with pytest.raises(ValueError):
        start_mlflow_server(tmp_path / "m.db", str(tmp_path / "art"), private_address=address, state_dir=tmp_path)
    assert not (tmp_path / "server.pid").exists()  # nothing was started


@pytest.mark.timeout(180)
def test_mlflow_server_serves_both_addresses_and_replaces_the_old_one(tmp_path):
    """What cluster.yaml runs on the head: reachable on 127.0.0.1 and the second address, nowhere else, under
    the names it is given; a server left by an earlier `ray up` (its pid file) is stopped first."""
    import socket
    import subprocess

    import psutil
    from mlflow.tracking import MlflowClient

    from pipeline.cluster import stop_mlflow_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    second = "127.0.0.2"  # stands in for the head's private VPC address
    state = tmp_path / "state"
    state.mkdir()
    previous = subprocess.Popen(["sleep", "600"], start_new_session=True)
    (state / "server.pid").write_text(str(previous.pid))
    try:
        start_mlflow_server(tmp_path / "mlflow.db", str(tmp_path / "artifacts"), port=port, private_address=second,
                            host_names=("vitpipe-head",), state_dir=state, workers=1)  # fmt: skip
        assert previous.poll() is not None  # the old server's process group was stopped
        listening = {c.laddr for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        assert {(a.ip, a.port) for a in listening} == {("127.0.0.1", port), (second, port)}
        experiment = MlflowClient(f"http://{second}:{port}").create_experiment("from-a-worker")
        assert MlflowClient(f"http://127.0.0.1:{port}").get_experiment(experiment).name == "from-a-worker"
        # The DNS-rebinding guard accepts the cluster's name for the head and refuses any other host name.
        assert _status_with_host(port, f"vitpipe-head:{port}") == 200
        assert _status_with_host(port, "attacker.example") == 403
    finally:
        previous.kill()
        assert stop_mlflow_server(state)
    assert not (state / "server.pid").exists()
    assert not any(c.laddr.port == port for c in psutil.net_connections("tcp") if c.status == "LISTEN")


def _status_with_host(port: int, host: str) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": host})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_cli_mlflow_server_refuses_a_wildcard_address(tmp_path, capsys):
    argv = ["cluster", "mlflow-server", "--db", str(tmp_path / "m.db"), "--artifacts", "s3://bucket/mlflow",
            "--private-address", "0.0.0.0", "--state-dir", str(tmp_path)]  # fmt: skip
    assert main(argv) == 1
    assert "refusing to bind MLflow to 0.0.0.0: not a private address" in capsys.readouterr().err
