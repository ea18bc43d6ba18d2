"""Multi-node behaviour on one machine: a 2-node Ray cluster (ray.cluster_utils.Cluster).

- Ray Data: one epoch of the training pipeline, streaming_split to consumers on two different nodes, uses
  every cut exactly once.
- Ray Train: the real driver with 2 workers that cannot share a node puts one on each, trains, checkpoints;
  both nodes read the checkpoint back.

Why a subprocess (tests/multinode/two_node_check.py): a Ray driver is global to its process, and this pytest
process may already be the driver of the session cluster (`ray_session`); connecting it to a second cluster
would mean shutting the first down under the other tests. The script runs with its own RAY_TMPDIR (Cluster
records its address there; in /tmp/ray it would capture every plain `ray.init()` on the machine) and in its
own process group, which the test ends whatever happens, so no Ray process outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
SCRIPT = Path(__file__).resolve().parent / "multinode" / "two_node_check.py"
TIMEOUT_S = 900  # ~1-2 minutes on an idle machine


@pytest.fixture(scope="module")
def facts(tiny_demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("multinode")
    ray_tmp = tempfile.mkdtemp(prefix="raymn-", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    log = out_dir / "two_node_check.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(tiny_demo), str(out_dir / "run"), str(out_dir / "facts.json")],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            returncode = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the cluster, if any
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if returncode != 0:
        pytest.fail(
            f"two_node_check.py {'timed out' if returncode is None else f'exited {returncode}'}:\n"
            f"{log.read_text()[-6000:]}"
        )
    return json.loads((out_dir / "facts.json").read_text())


def test_streaming_split_across_nodes_uses_every_cut_once_per_epoch(facts: dict) -> None:
    nodes = facts["nodes"]
    assert len(set(nodes.values())) == 2
    consumers = facts["split"]["consumers"]
    assert [c["node"] for c in consumers] == [nodes["node_a"], nodes["node_b"]], "one consumer per node"
    assert all(c["ids"] for c in consumers), "both nodes received batches"

    seen = Counter(cut_id for c in consumers for cut_id in c["ids"])
    assert [cut_id for cut_id, n in seen.items() if n > 1] == [], "a cut reached a rank twice in one epoch"
    all_ids = facts["split"]["all_ids"]
    counters = Counter()
    for c in consumers:
        counters.update(c["counters"])
    dropped = sum(counters[k] for k in ("too_short", "too_long", "empty_text", "unreadable_cuts"))
    assert set(seen) <= set(all_ids)
    assert len(all_ids) - len(seen) == dropped, f"cuts neither batched nor counted as dropped ({counters})"
    assert counters["cuts_read"] == len(all_ids) and counters["cuts_batched"] == len(seen)
    if dropped == 0:
        assert set(seen) == set(all_ids)


def test_training_workers_spread_over_both_nodes_and_checkpoints_are_readable_everywhere(facts: dict) -> None:
    training = facts["training"]
    assert training["ok"], training["error"]
    assert set(training["worker_nodes"]) == set(facts["nodes"].values()), "one Train worker on each node"
    for name, seen in facts["checkpoint_seen_from"].items():
        assert seen["node"] == facts["nodes"][name]
        assert seen["step"] == 3 and seen["path"] == training["last_checkpoint"]
