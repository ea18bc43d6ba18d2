"""Elastic training on two Ray nodes on one machine (ray.cluster_utils.Cluster): a node is lost mid-run, the run
goes on with the workers left, the node comes back and the run grows into it again (issue 19).

Run by tests/test_elastic.py as `python tests/multinode/elastic_check.py WORK_DIR OUT_JSON`, in its own process
for the reasons tests/multinode/two_node_check.py gives (a Ray driver is process-global; RAY_TMPDIR private).

The model counts how often each cut is trained on, in a float64 buffer saved with its checkpoints (the exact-resume
test's device: each rank adds `world size` per cut and checkpoints average buffers over ranks, so the count is the
sum over ranks, whatever the world size was). Every forward appends `<pid> <world size>` to `worlds.log`, so the
check can see the worker group shrink and grow. `trainer.min_nodes=1`, `trainer.num_nodes=2`, one worker per node
(3 CPUs each: two do not fit on the head, node_b has exactly 3): workers (1, 2).

Writes facts as JSON; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray
import ray.data
import torch
from ray.cluster_utils import Cluster
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from orchestrator.config import load_experiment  # noqa: E402
from orchestrator.testing import CutIdCollator  # noqa: E402
from speech_models.registry import LOSS, ModelEntry, register  # noqa: E402

CONFIG = ROOT / "configs" / "demo" / "salm.yaml"
SHARDS, CUTS_PER_SHARD, BATCH = 16, 6, 3
HEAD_CPUS, NODE_B_CPUS, WORKER_CPUS = 5, 3, 3  # one worker per node; 2 CPUs left on the head for Ray Data
OBJECT_STORE_BYTES = 256 * 1024**2
CONTROL = Path(os.environ.get("ELASTIC_CONTROL", "/nonexistent"))  # set in main(), inherited by Ray workers


class CutCounter(nn.Module):
    """Counts trained cuts. After its fourth forward a worker of a group of N waits while `hold_world<N>` exists,
    so the check acts at known points: the node is lost while the 2 workers wait (after a checkpoint), and comes
    back while the single worker waits (after it trained and checkpointed on its own); the restarts that follow
    replace the waiting workers anyway."""

    def __init__(self, cfg, data_cfg=None):
        super().__init__()
        self.cfg, self.head, self.forwards = cfg, nn.Linear(1, 1), 0
        self.register_buffer("times_trained", torch.zeros(SHARDS * CUTS_PER_SHARD, dtype=torch.float64))

    def forward(self, batch):
        self.forwards += 1
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        with open(CONTROL / "worlds.log", "a") as log:
            log.write(f"{os.getpid()} {world}\n")
        time.sleep(0.2)
        while self.forwards > 4 and (CONTROL / f"hold_world{world}").exists():
            time.sleep(0.2)
        for cut_id in batch["ids"]:
            self.times_trained[int(cut_id.rsplit("-", 1)[1])] += world
        return {"loss": self.head(batch["x"]).pow(2).mean(), "num_target_tokens": torch.tensor(len(batch["ids"]))}

    def validation_step(self, batch):
        return {"loss_sum": float(self.head(batch["x"]).pow(2).sum()), "num_tokens": len(batch["ids"])}


def worlds() -> list[tuple[int, int]]:
    path = CONTROL / "worlds.log"
    if not path.exists():
        return []
    return [tuple(int(v) for v in line.split()) for line in path.read_text().splitlines() if line.strip()]


def world_runs(entries: list[tuple[int, int]]) -> list[int]:
    """The world sizes in the order worker groups ran: [2, 1, 2] = shrank, then grew back."""
    runs: list[int] = []
    for _, world in entries:
        if not runs or runs[-1] != world:
            runs.append(world)
    return runs


def wait_for(condition, what: str, runner: threading.Thread, outcome: dict, timeout: float = 600.0) -> None:
    """Wait for `condition`; a run that ended first (its `outcome`: result or error) fails the check with its error."""
    deadline = time.time() + timeout
    while not condition():
        if not runner.is_alive():
            result = outcome.get("result")
            error = outcome.get("error") or (result.error if result is not None else None)
            raise RuntimeError(
                f"the run ended while waiting for {what}; world sizes: {world_runs(worlds())}; its error: {error}"
            )
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}; world sizes so far: {world_runs(worlds())}")
        time.sleep(0.5)


def overrides(shar: Path, llm: Path, run_dir: Path) -> list[str]:
    return [
        "model.model_type=elastic_cut_counter",
        f"model.pretrained_llm={llm}",  # a loadable LLM dir for the config's source check; the toy model reads none
        f"data.train_ds.input_cfg.0.shar_path={shar}",
        "data.train_ds.batch_size=3",
        "data.train_ds.batch_duration=null",
        "data.train_ds.use_bucketing=false",
        "data.train_ds.num_workers=2",
        f"data.validation_ds.input_cfg.0.shar_path={shar}",
        "data.validation_ds.batch_size=8",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.min_nodes=1",  # elastic: 1..2 workers
        "trainer.elastic_resize_interval_s=5",
        f"trainer.cpus_per_worker={WORKER_CPUS}",
        "trainer.max_epochs=1",
        "trainer.max_steps=1000",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "model.lr_scheduler.warmup_steps=1",
        "exp_manager.create_mlflow_logger=false",
        "exp_manager.checkpoint_callback_params.monitor=val_loss",
        "exp_manager.max_failures=5",
        f"exp_manager.explicit_log_dir={run_dir}",
    ]


def main(work: Path, out: Path) -> None:
    from orchestrator.demo.synthetic_shar import write_synthetic_shar
    from orchestrator.storage import checkpoints
    from orchestrator.training.driver import run_training
    from speech_models.testing import build_tiny_llm_dir

    global CONTROL
    CONTROL = work / "control"
    CONTROL.mkdir(parents=True, exist_ok=True)
    os.environ["ELASTIC_CONTROL"] = str(CONTROL)
    shar = write_synthetic_shar(work / "shar", n_cuts=SHARDS * CUTS_PER_SHARD, n_shards=SHARDS, durations=[1.0])
    llm = build_tiny_llm_dir(work / "llm")
    run_dir = work / "run"

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": HEAD_CPUS, "resources": {"node_a": 1}, "object_store_memory": OBJECT_STORE_BYTES},
    )
    node_b = cluster.add_node(num_cpus=NODE_B_CPUS, resources={"node_b": 1}, object_store_memory=OBJECT_STORE_BYTES)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True, runtime_env={"env_vars": {"ELASTIC_CONTROL": str(CONTROL)}})
    facts: dict = {}
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        register(ModelEntry("elastic_cut_counter", model=CutCounter, collator=CutIdCollator, metrics=(LOSS,)))
        cfg = load_experiment(CONFIG, overrides(shar, llm, run_dir)).cfg
        outcome: dict = {}

        def train() -> None:
            try:
                outcome["result"] = run_training(cfg)
            except Exception as exc:  # reported in the facts
                outcome["error"] = f"{type(exc).__name__}: {exc}"

        (CONTROL / "hold_world2").touch()
        (CONTROL / "hold_world1").touch()
        runner = threading.Thread(target=train, daemon=True)
        runner.start()

        # 1. Two workers train and checkpoint; then node_b is lost (its worker with it).
        wait_for(lambda: 2 in world_runs(worlds()), "a worker group of 2", runner, outcome)
        wait_for(
            lambda: (checkpoints.list_checkpoints(str(run_dir)) or [(0, "")])[-1][0] >= 2,
            "a checkpoint",
            runner,
            outcome,
        )
        wait_for(lambda: len(worlds()) >= 10, "both workers waiting after 5 steps", runner, outcome)
        facts["node_lost_after_forwards"] = len(worlds())
        cluster.remove_node(node_b, allow_graceful=False)

        # 2. The run goes on with the worker left (and checkpoints there); then node_b comes back.
        wait_for(
            lambda: world_runs(worlds())[-1:] == [1] and len([w for _, w in worlds() if w == 1]) >= 5,
            "training on the remaining node",
            runner,
            outcome,
        )
        facts["steps_on_one_node"] = len([w for _, w in worlds() if w == 1])
        (CONTROL / "hold_world2").unlink()  # the next group of 2 trains through
        cluster.add_node(num_cpus=NODE_B_CPUS, resources={"node_b": 1}, object_store_memory=OBJECT_STORE_BYTES)

        # 3. The worker group grows back to 2 and finishes the epoch.
        wait_for(
            lambda: world_runs(worlds())[-1:] == [2] and 1 in world_runs(worlds()), "growing back to 2", runner, outcome
        )
        (CONTROL / "hold_world1").unlink(missing_ok=True)
        runner.join(timeout=900)
        result = outcome.get("result")
        facts["training"] = {
            "ok": bool(result and result.ok),
            "error": outcome.get("error") if result is None else result.error,
            "finished": not runner.is_alive(),
        }
        facts["world_runs"] = world_runs(worlds())
        latest = checkpoints.latest_checkpoint(str(run_dir))
        from safetensors.torch import load_file

        counts = load_file(str(Path(latest) / checkpoints.WEIGHTS_FILE))["times_trained"]
        facts["times_trained"] = {f"cut-{i:06d}": round(float(c)) for i, c in enumerate(counts)}
    finally:
        ray.shutdown()
        cluster.shutdown()
    out.write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
