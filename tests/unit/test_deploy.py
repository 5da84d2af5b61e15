"""What can be checked here without Kubernetes or a Docker engine: manifests parse and carry the
fields KubeRay requires, every entrypoint and config they name exists, versions match the pin."""

import glob
import re
import shlex

import pytest
import yaml

MANIFESTS = sorted(glob.glob("deploy/kuberay/*.yaml"))


def pinned_ray() -> str:
    text = open("pyproject.toml").read()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def load(path):
    return yaml.safe_load(open(path))


def _containers(pod_template):
    return pod_template["spec"]["containers"]


def _check_cluster_spec(spec):
    assert spec["rayVersion"] == pinned_ray()
    head = spec["headGroupSpec"]
    assert "rayStartParams" in head and _containers(head["template"])
    for group in spec.get("workerGroupSpecs", []):
        assert group["groupName"] and "rayStartParams" in group
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert _containers(group["template"])
    for container in [*_containers(head["template"]),
                      *[c for g in spec.get("workerGroupSpecs", []) for c in _containers(g["template"])]]:
        assert container["name"] and container["image"]
        tag = container["image"].rsplit(":", 1)[1]
        assert tag.startswith(f"{pinned_ray()}-py"), container["image"]


def test_manifests_exist():
    names = {m.rsplit("/", 1)[1] for m in MANIFESTS}
    assert {"raycluster.yaml", "rayjob-precompute.yaml", "rayjob-train.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS)
def test_manifest_has_kuberay_fields(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    if doc["kind"] == "RayCluster":
        _check_cluster_spec(doc["spec"])
        assert doc["spec"]["enableInTreeAutoscaling"] is True
        groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
        gpu = _containers(groups["gpu"]["template"])[0]["resources"]["limits"]
        assert gpu["nvidia.com/gpu"] and "cpu" in groups
    else:
        assert doc["kind"] == "RayJob"
        spec = doc["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
        if "rayClusterSpec" in spec:
            _check_cluster_spec(spec["rayClusterSpec"])
        words = shlex.split(spec["entrypoint"].split("&&")[-1])
        module = words[words.index("-m") + 1]
        assert module in ("pipeline.teacher", "pipeline.student")
        assert glob.glob(module.replace(".", "/") + "/__main__.py")
        config = words[words.index("-m") + 2]
        assert glob.glob(config), f"{path} names {config}, which is not in the repo"
        from pipeline.config import load_config

        load_config(config, kind={"pipeline.teacher": "precompute", "pipeline.student": "train"}[module])


def test_cluster_selector_points_at_the_raycluster():
    names = {load(p)["metadata"]["name"] for p in MANIFESTS if load(p)["kind"] == "RayCluster"}
    for p in MANIFESTS:
        selector = load(p)["spec"].get("clusterSelector")
        if selector:
            assert selector["ray.io/cluster"] in names


def test_docker_base_image_matches_pinned_ray():
    text = open("docker/Dockerfile").read()
    assert re.search(r"^ARG RAY_VERSION=(.+)$", text, re.M).group(1) == pinned_ray()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-", text, re.M)
    ignored = open(".dockerignore").read().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_docker_image_installs_the_built_wheel():
    """The image runs the package as users install it: a wheel built in a first stage, installed in the
    final one; the source tree itself never lands in the final image."""
    text = open("docker/Dockerfile").read()
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "a build stage and the final stage"
    build, final = stages
    assert "pip wheel" in build and re.search(r"COPY .*pipeline", build)
    assert re.search(r"COPY --from=\w+ .*\.whl", final) and re.search(r"pip install .*\.whl", final)
    assert not re.search(r"COPY .*pipeline", final) and "jobs/configs" in final


def test_local_cluster_scripts_exist():
    for name in ("deploy/local/up.sh", "deploy/local/down.sh", "deploy/local/cluster.py"):
        assert glob.glob(name)


def test_a_submitted_working_dir_leaves_build_artefacts_behind(tmp_path):
    """What Ray packs for a job's working_dir (its own packer, with our excludes and no .gitignore):
    the user's configs and modules, never wheels, sdists, checkpoints or a virtualenv."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from pipeline.submit import EXCLUDES

    work = tmp_path / "work"
    for name in ("configs/train.yaml", "my_models.py", "py_spy-0.4.3-py2.py3-none-any.whl", "dist/pkg-1.0.tar.gz",
                 "build/lib/x.py", ".venv/bin/python", "runs/a/student.pt", "model.pt", "pkg.egg-info/PKG-INFO"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text("x")
    create_package(str(work), tmp_path / "pkg.zip", include_gitignore=False, excludes=EXCLUDES)
    packed = sorted(n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/"))
    assert packed == ["configs/train.yaml", "my_models.py"]
