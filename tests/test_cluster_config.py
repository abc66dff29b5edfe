"""cluster.yaml checked offline: Ray's own schema and checks, custom resources, MLflow on a private address,
token auth on every node, raysad installed from the mounted project, every command valid bash; the same pinned
versions on every node (constraints/cluster.txt), the paper sweeps pinned to the GPU node types and kept on the
shared file system, the opt-in EFS mount run against stubs, and the IAM policy the docs give the head's role."""
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


# ------------------------------------------------------------------------- the same versions everywhere ----
CONSTRAINTS = "/home/ubuntu/raysad/constraints/cluster.txt"      # where file_mounts puts constraints/cluster.txt
_VALUED_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                   "-f", "--find-links"}


def _pip_installs(cfg: dict) -> list[list[str]]:
    """The arguments of every `pip install` in the commands (after `install`, up to the next shell operator)."""
    found = []
    for cmd in _all_commands(cfg):
        lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True  # words split at blanks and at ; & | ( ) only
        words = list(lexer)
        for i, word in enumerate(words[:-1]):
            if Path(word).name == "pip" and words[i + 1] == "install":
                args = []
                for arg in words[i + 2:]:
                    if arg and set(arg) <= set(";&|()"):
                        break
                    args.append(arg)
                found.append(args)
    return found


def _options(args: list[str], *names: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in names]


def _positional(args: list[str]) -> list[str]:
    return [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or args[i - 1] not in _VALUED_OPTIONS)]


def _constraints() -> dict[str, str]:
    """constraints/cluster.txt as {canonical name: version}; every line an exact `name==version` pin."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints" / "cluster.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
            assert m, f"not an exact pin: {line!r}"
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"{name} pinned twice"
            pins[name] = m.group(2)
    return pins


def _project_requirements(extras: list[str]) -> list:
    """raysad's dependencies and those of the given extras (pyproject.toml), as packaging Requirements."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]
            + [r for extra in extras for r in project["optional-dependencies"][extra]]]


def test_every_pip_install_uses_the_cluster_constraints(cluster):
    installs = _pip_installs(cluster)
    named = {re.split(r"[\[=<>!~]", Path(a).name)[0] for args in installs for a in _positional(args)}
    assert {"pip", "ray", "torch", "raysad", "boto3"} <= named, installs  # the parser finds every install
    for args in installs:
        given = [c.replace("~", "/home/ubuntu", 1) if c.startswith("~/") else c
                 for c in _options(args, "-c", "--constraint")]
        assert given == [CONSTRAINTS], f"pip install {' '.join(args)}: -c {CONSTRAINTS} expected, got {given}"


def test_file_mounts_carry_the_constraints_file(cluster):
    assert cluster["auth"]["ssh_user"] == "ubuntu"  # so `~` in the commands is /home/ubuntu
    local = cluster["file_mounts"].get(CONSTRAINTS)
    assert local is not None, f"{CONSTRAINTS} is not in file_mounts"
    assert (ROOT / local).resolve() == (ROOT / "constraints" / "cluster.txt").resolve() and (ROOT / local).is_file()


def test_constraints_pin_every_package_the_nodes_install(cluster):
    """Every package a pip command names, raysad's dependencies and the extras it is installed with, pinned
    (==) in constraints/cluster.txt; a version a command names itself agrees with the file, and every pin
    satisfies pyproject.toml's range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = _constraints()
    project_forms = ("/home/ubuntu/raysad", "~/raysad")
    named, inline, extras = set(), {}, set()
    for args in _pip_installs(cluster):
        for arg in _positional(args):
            if arg.startswith(("/", "~", ".")):  # a local project: raysad, with its extras
                path, _, rest = arg.partition("[")
                assert path.rstrip("/") in project_forms, f"pip installs an unknown project {arg}"
                extras |= {e.strip() for e in rest.rstrip("]").split(",") if e.strip()}
                continue
            req = Requirement(arg)
            named.add(canonicalize_name(req.name))
            inline |= {canonicalize_name(req.name): s.version for s in req.specifier if s.operator == "=="}
    assert extras == {"vllm"}
    project = _project_requirements(sorted(extras))
    named |= {canonicalize_name(r.name) for r in project}
    assert not named - set(pins), f"installed but not pinned: {sorted(named - set(pins))}"
    for name, version in inline.items():
        assert pins[name] == version, f"{name}: a command says {version}, constraints/cluster.txt {pins[name]}"
    for req in project:
        pin = pins[canonicalize_name(req.name)]
        assert req.specifier.contains(pin, prereleases=True), f"{req.name}=={pin} is outside pyproject's {req}"


# --------------------------------------------------------------------------------- the paper sweeps ----
PAPER_SWEEPS = sorted((ROOT / "tune_configs").glob("paper_*.yaml"))


def _shared_mount(cfg: dict) -> tuple[str, str]:
    """The opt-in shared file system's (mount command, mount point)."""
    cmds = [c for c in cfg["setup_commands"] if "mount -t nfs4" in c]
    assert len(cmds) == 1, "one setup command (every node) mounts the shared file system"
    point = re.search(r"mount -t nfs4 .*?\S+:/\"? (/\S+)", cmds[0])
    assert point, cmds[0]
    return cmds[0], point.group(1)


def test_paper_sweeps_pin_their_work_to_the_gpu_node_types(cluster):
    """Each paper sweep's engines and Train workers ask for custom resources a GPU node type offers, one unit
    per GPU they use; its storage, models and data lie on the file system every node mounts."""
    from raysad.tune import load_sweep

    offered = {name: node for node in cluster["available_node_types"].values() for name in node["resources"]}
    _, shared = _shared_mount(cluster)
    assert len(PAPER_SWEEPS) == 3
    for path in PAPER_SWEEPS:
        sweep = load_sweep(path)
        d, r, e = sweep.distill, sweep.rollout, sweep.evaluate
        gpus = {  # resource ask -> the GPUs each of those engines / workers takes
            "distill.worker_resources": (d.get("worker_resources"), d["gpus_per_worker"]),
            "rollout.engine_resources": (r.get("engine_resources"),
                                         r.get("gpus_per_engine") or r.get("tensor_parallel", 1)),
            "evaluate.engine_resources": (e.get("engine_resources"), e.get("gpus_per_engine") or 1),  # hf: 1 GPU
        }
        assert r["policy"] == "vllm"
        for field, (ask, per_gpu) in gpus.items():
            assert ask, f"{path.name}: {field} pins no node type"
            for name, amount in ask.items():
                node = offered.get(name)
                assert node is not None, f"{path.name}: {field} asks for {name}, which no node type offers"
                assert node["node_config"]["InstanceType"].startswith(("g5.", "p4d.")), (path.name, field)
                assert amount == per_gpu <= node["resources"][name], (path.name, field, amount, per_gpu)
        for section in (r, e):  # env actors need no GPU node, but what they ask for must exist
            assert set(section.get("env_actor_resources", {})) <= set(offered), path.name
        students = [s for space in (sweep.space if isinstance(sweep.space, list) else [sweep.space])
                    for s in space["student"] if s.startswith("/")]
        for where in [sweep.storage, sweep.teacher, r["data"], e["data"], *students]:
            assert where.startswith(shared.rstrip("/") + "/"), f"{path.name}: {where} is not under {shared}"


# ------------------------------------------------------------------------------ shared file system ----
def _run_mount_command(cmd: str, tmp_path: Path, efs_id: str | None, mounted: bool, mount_rc: int = 0):
    """Run the setup command with sudo, mount, mountpoint, mkdir, chown, dpkg and apt-get replaced by stubs
    that log their arguments; returns (exit status, the log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.write_text("")
    stubs = {"sudo": 'exec "$@"', "mountpoint": f"exit {0 if mounted else 1}", "mount": f"exit {mount_rc}",
             "mkdir": "exit 0", "chown": "exit 0", "dpkg": "exit 0", "apt-get": "exit 0"}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f'#!/bin/bash\necho "{name} $*" >> {log}\n{body}\n')
        (bin_dir / name).chmod(0o755)
    if efs_id is not None:
        cmd = cmd.replace("EFS_ID=fs-PLACEHOLDER;", f"EFS_ID={efs_id};", 1)
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True,
                            env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    return result.returncode, log.read_text().splitlines()


def test_shared_file_system_is_opt_in_and_a_failed_mount_fails_the_setup(cluster, tmp_path):
    cmd, point = _shared_mount(cluster)
    assert "EFS_ID=fs-PLACEHOLDER;" in cmd
    host = re.search(r"\$EFS_ID\.efs\.([a-z0-9-]+)\.amazonaws\.com", cmd)
    assert host and host.group(1) == cluster["provider"]["region"]  # the EFS name of the cluster's region

    rc, calls = _run_mount_command(cmd, tmp_path, None, mounted=False)
    assert rc == 0 and not any(c.startswith(("mount", "mkdir")) for c in calls), calls  # placeholder: nothing

    rc, calls = _run_mount_command(cmd, tmp_path, "fs-0123456789abcdef0", mounted=False)
    mounts = [c for c in calls if c.startswith("mount ")]
    assert rc == 0 and len(mounts) == 1, calls
    assert mounts[0].endswith(f"fs-0123456789abcdef0.efs.{host.group(1)}.amazonaws.com:/ {point}")
    assert "nfsvers=4.1" in mounts[0] and f"chown ubuntu:ubuntu {point}" in calls

    rc, calls = _run_mount_command(cmd, tmp_path, "fs-0123456789abcdef0", mounted=True)
    assert rc == 0 and not any(c.startswith("mount ") for c in calls)  # a rerun of `ray up` mounts nothing twice

    rc, calls = _run_mount_command(cmd, tmp_path, "fs-0123456789abcdef0", mounted=False, mount_rc=32)
    assert rc != 0 and not any(c.startswith("chown") for c in calls)  # the node's setup fails, loudly


# ------------------------------------------------------------------------- the head's IAM role (SSM) ----
def test_docs_give_the_heads_role_the_ssm_policy_the_worker_amis_need(cluster):
    """The GPU ImageIds are `resolve:ssm:` names that EC2 resolves with the launcher's rights: the autoscaler on
    the head, with Ray's default role. docs/cluster.md's policy covers each of them, names that role, and the
    EFS how-to names the security group Ray makes."""
    from fnmatch import fnmatchcase

    import ray.autoscaler

    docs = (ROOT / "docs" / "cluster.md").read_text()
    ray_aws = (Path(ray.autoscaler.__file__).parent / "_private" / "aws" / "config.py").read_text()
    prefix = re.search(r'^RAY = "([^"]+)"', ray_aws, re.M).group(1)
    role = prefix + re.search(r'^DEFAULT_RAY_IAM_ROLE = RAY \+ "([^"]+)"', ray_aws, re.M).group(1)
    group = prefix + re.search(r'^SECURITY_GROUP_TEMPLATE = RAY \+ "([^"]+)"', ray_aws, re.M).group(1)
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert "IamInstanceProfile" not in head["node_config"]  # so the head runs with Ray's default role

    policies = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", docs, re.S)]
    allowed = []  # the resources the docs' policies allow ssm:GetParameters on
    for statement in (s for policy in policies for s in policy["Statement"]):
        actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        if statement["Effect"] == "Allow" and "ssm:GetParameters" in actions:
            resources = statement["Resource"]
            allowed += [resources] if isinstance(resources, str) else resources
    region = cluster["provider"]["region"]
    workers = [n for name, n in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    ssm = [n["node_config"]["ImageId"].removeprefix("resolve:ssm:") for n in workers
           if n["node_config"]["ImageId"].startswith("resolve:ssm:")]
    assert ssm, "no resolve:ssm: image: then drop this test and the policy from the docs"
    for parameter in ssm:
        arn = f"arn:aws:ssm:{region}::parameter{parameter}"
        assert any(fnmatchcase(arn, res) for res in allowed), f"docs/cluster.md's policy does not cover {arn}"
    assert re.search(rf"aws iam put-role-policy --role-name {re.escape(role)}\b", docs)
    assert "ssm:GetParameters" in (ROOT / "cluster.yaml").read_text() and role in (ROOT / "cluster.yaml").read_text()
    assert group.format(cluster["cluster_name"]) in docs
