"""cluster.yaml checked offline: Ray's own schema and checks, custom resources, MLflow on a private address,
token auth on every node, raysad installed from the mounted project, every command valid bash."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    cmds = [c for k in keys for c in cfg.get(k, [])]
    for node in cfg["available_node_types"].values():
        cmds += node.get("initialization_commands", []) + node.get("worker_setup_commands", [])
    return cmds


def test_valid_against_ray_schema_and_checks(cluster):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    validate_config(prepare_config(cluster))  # defaults merged, head type known, min_workers <= max_workers
    assert cluster["provider"]["type"] == "aws"


def test_node_types_and_custom_resources(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["node_config"]["InstanceType"].startswith("m5.")
    assert not {"teacher_engine", "trainer", "GPU"} & set(head["resources"])

    teacher = [t for t in types.values() if t["resources"].get("teacher_engine", 0) > 0]
    trainer = [t for t in types.values() if t["resources"].get("trainer", 0) > 0]
    assert len(teacher) == 1 and len(trainer) == 1
    assert teacher[0]["node_config"]["InstanceType"] == "g5.12xlarge"
    assert teacher[0]["resources"]["teacher_engine"] == 4  # one unit per A10G
    assert trainer[0]["node_config"]["InstanceType"] == "p4d.24xlarge"
    assert trainer[0]["resources"]["trainer"] == 8         # one unit per A100
    for node in teacher + trainer:
        assert node["min_workers"] == 0 < node["max_workers"] <= cluster["max_workers"]
        assert "nvidia-driver-gpu" in node["node_config"]["ImageId"]  # GPU nodes boot with drivers


def test_mlflow_server_binds_the_private_address_only(cluster):
    head_cmds = cluster["head_start_ray_commands"]
    server = [c for c in head_cmds if "mlflow server" in c]
    assert len(server) == 1
    cmd = server[0]
    assert "0.0.0.0" not in cmd and "::" not in cmd
    host = re.search(r"--host[ =](\$\(hostname -I \| awk '\{print \$1\}'\)|\S+)", cmd)
    assert host and host.group(1) == "$(hostname -I | awk '{print $1}')"  # the first (private) address
    assert "sqlite:////home/ubuntu/mlflow.db" in cmd
    port = re.search(r"--port[ =](\d+)", cmd).group(1)
    # the server starts before Ray, so jobs and actors inherit the URI from the raylet's environment
    assert head_cmds.index(cmd) < next(i for i, c in enumerate(head_cmds) if "ray start --head" in c)
    assert any(f"MLFLOW_TRACKING_URI=http://$(hostname -I | awk '{{print $1}}'):{port}" in c for c in head_cmds)
    assert any(f"MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:{port}" in c
               for c in cluster["worker_start_ray_commands"])
    assert not any("0.0.0.0" in c for c in _all_commands(cluster))


def test_token_auth_on_every_node(cluster):
    mounts = cluster["file_mounts"]
    assert mounts["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert any("export RAY_AUTH_MODE=token" in c for c in cluster["initialization_commands"])
    starts = [c for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)


def test_setup_installs_raysad_from_the_mounted_project(cluster):
    import tomllib

    project = "/home/ubuntu/raysad"
    mounted = {remote[len(project) + 1:]: local for remote, local in cluster["file_mounts"].items()
               if remote.startswith(project + "/")}
    for remote, local in mounted.items():  # mounted from the project root, under the same name
        assert Path(local).as_posix().removeprefix("./") == remote and (ROOT / local).exists(), remote
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", pyproject["project"]["readme"], "tune_configs",
              *pyproject["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= set(mounted), f"not mounted: {needed - set(mounted)}"
    remote_forms = {project, project.replace("/home/ubuntu", "~")}

    def installs_raysad(cmds: list[str]) -> bool:
        return any("pip install" in c and "-e" in c and any(p in c for p in remote_forms) for c in cmds)

    assert installs_raysad(cluster["head_setup_commands"])
    assert installs_raysad(cluster["worker_setup_commands"])
    assert any("[vllm]" in c for c in cluster["worker_setup_commands"])
    pin = [m for c in cluster["setup_commands"] for m in re.findall(r"ray\[[^\]]*\]==([\d.]+)", c)]
    assert len(pin) == 1 and tuple(map(int, pin[0].split(".")[:2])) >= (2, 52)  # 2.52: first with token auth
    assert any("torch==" in c and "whl/cpu" in c for c in cluster["head_setup_commands"])


def test_every_command_is_valid_bash(cluster):
    for cmd in _all_commands(cluster):
        # the autoscaler runs each command through `bash -c`; -n parses without running
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{shlex.quote(cmd)}: {result.stderr}"


def test_pinning_flags_in_the_docs_parse_and_name_resources_the_node_types_offer(cluster):
    """The example commands (cluster.yaml's comments, docs/cluster.md) pin work by custom resources: each parses
    into its config field and names only resources some node type has."""
    from raysad.config import ConfigError, build_config
    from raysad.distill import DistillConfig
    from raysad.rollout import RolloutConfig

    text = (ROOT / "cluster.yaml").read_text() + (ROOT / "docs" / "cluster.md").read_text()
    offered = {name for node in cluster["available_node_types"].values() for name in node["resources"]}
    found = re.findall(r"--(engine-resources|env-actor-resources|worker-resources)[ =](\w+=[\d.]+(?:,\w+=[\d.]+)*)",
                       text)
    assert {flag for flag, _ in found} >= {"engine-resources", "worker-resources"}
    for flag, value in found:
        field = flag.replace("-", "_")
        if field == "worker_resources":
            cfg = build_config(DistillConfig, trajectories="t.jsonl", student="tiny-1m", **{field: value})
        else:
            cfg = build_config(RolloutConfig, **{field: value})
        asked = getattr(cfg, field)
        assert asked and set(asked) <= offered and all(v > 0 for v in asked.values()), (flag, value)
    with pytest.raises(ConfigError, match="engine_resources.*key=value"):
        build_config(RolloutConfig, engine_resources="teacher_engine")
    with pytest.raises(ValueError, match="GPU has its own field"):
        RolloutConfig(engine_resources={"GPU": 1})
