"""cluster.yaml against Ray's own validator, and the smoke scenario on a 2-node Ray cluster."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = [REPO / "cluster.yaml", *sorted((REPO / "tune_configs").glob("cluster_*.yaml"))]


def _validate(cfg: dict) -> None:
    """What `ray up` checks before touching any machine (offline: fills defaults, then the JSON schema)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=[p.name for p in CLUSTER_FILES])
def test_cluster_file_passes_rays_validator(path):
    cfg = yaml.safe_load(path.read_text())
    _validate(cfg)
    assert any("pip install" in c and "raydfml" in c for c in cfg["setup_commands"]), "installs this package"
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def test_local_cluster_file_documents_its_placeholders():
    text = (REPO / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["provider"]["type"] == "local" and cfg["provider"]["head_ip"] and cfg["provider"]["worker_ips"]
    assert text.count("REPLACE") >= 4


def test_gpu_cluster_file_has_gpu_workers():
    cfg = yaml.safe_load((REPO / "tune_configs" / "cluster_aws_gpu.yaml").read_text())
    gpu_types = [t for t in cfg["available_node_types"].values() if t.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_types and cfg["head_node_type"] in cfg["available_node_types"]


@pytest.mark.parametrize("path,old,new,needle", [
    (REPO / "cluster.yaml", "worker_start_ray_commands:", "worker_start_ray_comands:", "worker_start_ray_comands"),
    (REPO / "cluster.yaml", "setup_commands:\n", "setup_comands:\n", "setup_comands"),
    (REPO / "tune_configs" / "cluster_aws_gpu.yaml", "    max_workers: 4", "    max_worker: 4", "max_worker"),
    (REPO / "tune_configs" / "cluster_aws_gpu.yaml", "head_node_type: head", "head_node_type: heda", "head_node_type"),
], ids=["top-level", "setup", "node-type-key", "head-type"])
def test_misspelled_cluster_file_fails_validation(path, old, new, needle):
    text = path.read_text()
    assert old in text
    bad = yaml.safe_load(text.replace(old, new, 1))
    with pytest.raises(Exception) as exc:
        _validate(bad)
    assert needle in str(exc.value)


# ----------------------------------------------------------------------------- two nodes
MULTINODE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster

    from raydfml.baselines import evaluate_final
    from raydfml.config import resolve
    from raydfml.report import RunReport
    from raydfml.cluster import ensure_ray
    from raydfml.runtime.driver import train
    from raydfml.runtime.pool import prepare_pool

    root, out = sys.argv[1], Path(sys.argv[2])
    node = dict(num_cpus=1, object_store_memory=150 * 1024 ** 2)
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    cfg = resolve("mr", "deepinv", "smoke", {
        "data.data_root": root, "runtime.address": cluster.address, "runtime.workers": 2,
        "runtime.actor_cpus": 0.3, "runtime.pool_strategy": "spread",
        "train.rounds": 2, "train.eval_every": 1, "train.val_tasks": 3, "train.test_tasks": 4,
        "train.baselines": []})
    ensure_ray(address=cfg.runtime.address)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    entries = prepare_pool(cfg, workers=2, progress=False)
    pool_nodes = []

    def record(r, metrics, executor):
        pool_nodes.append(ray.get([p.node_id.remote() for p in executor.pools]))

    report = RunReport(out, cfg.to_dict())
    trained = train(cfg, out, report, progress=False, entries=entries, on_round_end=record)
    results = evaluate_final(cfg, trained, entries, progress=False)
    results.update(scenario=cfg.scenario, method=cfg.method, profile=cfg.profile, seed=cfg.seed, wall_s=1.0)
    report.finish(results)
    print("RESULT " + json.dumps({"nodes": sorted(nodes), "pool_nodes": pool_nodes,
                                  "meta_test": results["meta_test"]}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_smoke_scenario_runs_teacher_pools_on_both_nodes(tmp_path, tmp_path_factory):
    """Its own 2-node cluster in a subprocess: never mixed with the session's Ray instance."""
    from raydfml.config import resolve
    from raydfml.data.layout import ensure_dataset
    from raydfml.runtime.pool import prepare_pool

    root = tmp_path_factory.getbasetemp() / "raydfml-sweep-data"     # shared with test_tune.py
    root.mkdir(exist_ok=True)
    ensure_dataset(root, "glyphs-smoke")
    prepare_pool(resolve("mr", "deepinv", "smoke", {"data.data_root": str(root)}), workers=0, progress=False)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TQDM_DISABLE="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", MULTINODE, str(root), str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=400, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    assert len(res["nodes"]) == 2
    assert len(res["pool_nodes"]) == 2                        # one record per round
    for per_round in res["pool_nodes"]:
        assert set(per_round) == set(res["nodes"]), "TeacherPool actors did not run on both nodes"
    assert {r["shot"] for r in res["meta_test"]} == {1, 5}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["meta_test"]


def test_ray_failing_to_start_is_one_line_that_says_what_to_try(monkeypatch):
    import ray

    from raydfml.cluster import ensure_ray
    from raydfml.errors import UserError

    def refuse(**kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nPlease specify the one to connect to.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(UserError) as err:
        ensure_ray(address="10.0.0.9:6379")
    msg = str(err.value)
    assert "\n" not in msg and "--address 10.0.0.9:6379" in msg and "ray status" in msg
    monkeypatch.setattr(ray, "init", lambda **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(UserError, match="local Ray instance.*No space left.*--workers 0"):
        ensure_ray()


def test_local_ray_workers_find_the_package_and_start_warm(tmp_path):
    """A local Ray started by ensure_ray: its workers import raydfml from this checkout even when it is
    not installed (PYTHONPATH inherited, not a job runtime environment, which would make Ray start fresh
    workers for the job), and the driver's own PYTHONPATH is left as it was."""
    script = textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from raydfml.cluster import ensure_ray
        before = os.environ.get("PYTHONPATH")
        ray = ensure_ray(num_cpus=1)
        assert os.environ.get("PYTHONPATH") == before, (before, os.environ.get("PYTHONPATH"))
        assert not ray.get_runtime_context().runtime_env.get("env_vars"), ray.get_runtime_context().runtime_env

        @ray.remote(num_cpus=1)
        def where():
            import raydfml
            return raydfml.__file__, os.environ.get("PYTHONPATH", "")

        path, pythonpath = ray.get(where.remote())
        assert path.startswith({str(REPO)!r}), path
        print("ok", pythonpath.split(os.pathsep)[0])
    ''')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok", str(REPO)]
