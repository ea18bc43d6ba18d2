"""Two Ray nodes on one machine (ray.cluster_utils.Cluster): data split and Train workers across nodes.

Run by tests/test_multinode.py as `python tests/multinode/two_node_check.py DEMO_DIR RUN_DIR OUT_JSON`, in its
own process: a Ray driver is process-global, so this cluster cannot live inside a pytest process that already
holds the session's Ray. The caller sets RAY_TMPDIR to a private directory (Cluster records its address in
$RAY_TMPDIR/ray/ray_current_cluster, which every plain `ray.init()` on the machine would otherwise join) and
RAY_AUTH_MODE=disabled (else Ray 2.60 enables token auth and writes ~/.ray/auth_token).

Writes facts (node ids, cut ids, counters, checkpoint steps) as JSON; the test asserts on them.
"""

from __future__ import annotations

import gzip
import json
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray
import ray.data
from ray.cluster_utils import Cluster

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from orchestrator.config import load_experiment  # noqa: E402
from orchestrator.testing import tiny_training_overrides  # noqa: E402

DEMO_CONFIG = ROOT / "configs" / "demo" / "salm.yaml"
NODE_CPUS = 3  # a Train worker takes 2 (below), so each node holds one worker and one CPU for Ray Data
OBJECT_STORE_BYTES = 256 * 1024**2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
class Consumer:
    """One rank's side of a streaming_split, pinned to a node by a custom resource."""

    def consume(self, split) -> dict:
        from orchestrator.data.stream import iterate_batches

        stream = iterate_batches(split)
        ids = [cut_id for _, meta in stream for cut_id in meta.ids]
        return {"node": ray.get_runtime_context().get_node_id(), "ids": ids, "counters": dict(stream.totals)}


@ray.remote(num_cpus=0)
def latest_checkpoint_step(run_dir: str) -> dict:
    from orchestrator.storage import checkpoints, filesystems

    latest = checkpoints.latest_checkpoint(run_dir)
    state = json.loads(filesystems.read_text(f"{latest}/state.json"))
    return {"node": ray.get_runtime_context().get_node_id(), "path": latest, "step": state.get("step")}


def manifest_ids(shar_dir: Path) -> list[str]:
    ids = []
    for path in sorted(shar_dir.glob("cuts.*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            ids += [json.loads(line)["id"] for line in f if line.strip()]
    return ids


def split_one_epoch(demo: Path, run_dir: str, nodes: dict[str, str]) -> dict:
    """The training pipeline over one epoch, streaming_split to two consumers on two different nodes."""
    from orchestrator.data.datasets import build_dataset
    from orchestrator.data.plan import plan_dataset
    from speech_models.registry import build_collator

    cfg = load_experiment(DEMO_CONFIG, tiny_training_overrides(demo, run_dir)).cfg
    collate = build_collator(cfg.model, cfg.data, cfg.data.train_ds)
    dataset = build_dataset(plan_dataset("train", cfg.data.train_ds, cfg.data, collate, epochs=1))
    # equal=False: every batch goes to exactly one consumer and none is dropped (the training split uses
    # equal=True, which may drop the last few batches of a finite stream to keep step counts equal).
    splits = dataset.streaming_split(2, equal=False, locality_hints=[nodes["node_a"], nodes["node_b"]])
    consumers = [Consumer.options(resources={name: 0.5}).remote() for name in ("node_a", "node_b")]
    results = ray.get([c.consume.remote(s) for c, s in zip(consumers, splits, strict=True)])
    for consumer in consumers:
        ray.kill(consumer)
    return {"consumers": results, "all_ids": manifest_ids(demo / "asr" / "train")}


def train_on_two_nodes(demo: Path, run_dir: str, address: str) -> dict:
    """The real driver with 2 workers that do not fit on one node, then where its workers ran."""
    from ray.util.state import list_actors

    from orchestrator.training.driver import run_training

    overrides = [*tiny_training_overrides(demo, run_dir, max_steps=3), "trainer.devices=2", "trainer.cpus_per_worker=2"]
    result = run_training(load_experiment(DEMO_CONFIG, overrides).cfg)
    workers = list_actors(
        address=address, filters=[("class_name", "=", "RayTrainWorker")], limit=100, raise_on_missing_output=False
    )
    return {
        "ok": result.ok,
        "error": result.error,
        "last_checkpoint": result.last_checkpoint,
        "worker_nodes": sorted(a.node_id for a in workers),
    }


def main(demo: Path, run_dir: str, out: Path) -> None:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": NODE_CPUS,
            "resources": {"node_a": 1},
            "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": True,  # the state API (list_actors) goes through it
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    cluster.add_node(num_cpus=NODE_CPUS, resources={"node_b": 1}, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        nodes = {
            name: n["NodeID"]
            for n in ray.nodes()
            for name in ("node_a", "node_b")
            if name in n["Resources"] and n["Alive"]
        }
        facts: dict = {"nodes": nodes}
        facts["split"] = split_one_epoch(demo, run_dir, nodes)
        facts["training"] = train_on_two_nodes(demo, run_dir, cluster.address)
        facts["checkpoint_seen_from"] = {
            name: ray.get(latest_checkpoint_step.options(resources={name: 0.01}).remote(run_dir))
            for name in ("node_a", "node_b")
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    out.write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
