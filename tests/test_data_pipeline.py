"""Shar -> Ray Data batches: shard discovery, filtering and counters, corrupt data, S2S sample rates, exact resume
(every batch once across resumes, other world sizes and num_workers), equal step counts across ranks and
exactly-once validation."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import shutil
import tarfile
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config.schema import DataConfig, DatasetConfig, InputConfig, ValidationConfig
from orchestrator.data.datasets import SplitDataConfig, build_datasets, ray_data_config
from orchestrator.data.plan import TRAIN, plan_dataset
from orchestrator.data.position import DataPosition, merge_positions
from orchestrator.data.read_task import run_read_task
from orchestrator.data.resume_board import ResumeBoard
from orchestrator.data.shar import CorruptShardError, SharLayoutError, discover_dir, discover_shards, read_shard
from orchestrator.data.stream import BatchStream, iterate_batches
from orchestrator.demo.synthetic_shar import corrupt_shard, write_synthetic_shar
from orchestrator.testing import pad_audio_collator

# Cycled per cut: 0.05 s is too short (min 0.1), 9.0 s too long (max 6.0); every 9th text is empty.
DURATIONS = [1.0, 2.2, 0.05, 1.7, 3.1, 9.0, 2.5, 0.8]
SHARD_SIZES = [3, 20, 5, 12, 8]  # uneven on purpose


@pytest.fixture(scope="module")
def asr_dir(tmp_path_factory) -> Path:
    return write_synthetic_shar(
        tmp_path_factory.mktemp("asr") / "shar",
        n_cuts=sum(SHARD_SIZES),
        shard_sizes=SHARD_SIZES,
        durations=DURATIONS,
        empty_text_every=9,
        sample_rate=8000,  # the pipeline resamples to 16 kHz
    )


@pytest.fixture(scope="module")
def s2s_dir(tmp_path_factory) -> Path:
    return write_synthetic_shar(
        tmp_path_factory.mktemp("s2s") / "shar", n_cuts=6, n_shards=2, durations=(1.0, 2.0), with_target_audio=True
    )


def damaged_copy(src: Path, dst: Path, *damage: tuple[int, str]) -> Path:
    shutil.copytree(src, dst)
    for shard, field in damage:
        corrupt_shard(dst, shard, field)
    return dst


def expected_counts(shar_dir: Path, min_d: float = 0.1, max_d: float = 6.0) -> Counter:
    counts: Counter = Counter()
    for path in sorted(shar_dir.glob("cuts.*.jsonl.gz")):
        for line in gzip.decompress(path.read_bytes()).decode().splitlines():
            cut = json.loads(line)
            text = " ".join(s["text"] for s in cut["supervisions"]).strip()
            key = (
                "too_short"
                if cut["duration"] < min_d
                else "too_long"
                if cut["duration"] > max_d
                else "empty_text"
                if not text
                else "cuts_batched"
            )
            counts[key] += 1
    return counts


def data_cfg(shar_dir: Path, **train) -> DataConfig:
    train = {"batch_size": 3, "max_duration": 6.0, **train}
    return DataConfig(train_ds=DatasetConfig(shar_path=str(shar_dir), **train))


def read_all(plan) -> list:
    """Every row of every read task of a plan, run in-process (no Ray)."""
    return [table for task in range(plan.num_tasks) for table in run_read_task(plan, task)]


def read_interleaved(plan) -> list:
    """Rows as Ray Data would deliver them: the tasks of a group run side by side (round robin here)."""
    rows, task = [], 0
    while task < plan.num_tasks:
        first = plan.tasks[task].first_epoch
        group = [t for t in range(task, plan.num_tasks) if plan.tasks[t].first_epoch == first]
        running = [run_read_task(plan, t) for t in group]
        while running:
            for gen in list(running):
                row = next(gen, None)
                if row is None:
                    running.remove(gen)
                else:
                    rows.append(row)
        task = group[-1] + 1
    return rows


class RecordingCollator:
    """Pads like pad_audio_collator and keeps the example dicts it saw (in-process tests only)."""

    def __init__(self) -> None:
        self.examples: list[dict] = []

    def __call__(self, examples):
        self.examples += examples
        return pad_audio_collator(examples)


# ---------------------------------------------------------------------------------------------- shards


def test_discover_dir_lists_shards_and_audio_fields(s2s_dir):
    shards = discover_dir(str(s2s_dir))
    assert [Path(s.cuts).name for s in shards] == ["cuts.000000.jsonl.gz", "cuts.000001.jsonl.gz"]
    assert set(shards[0].fields) == {"recording", "target_audio"}
    assert all(s.has_target_audio for s in shards)


def test_missing_field_shard_error_names_path_and_counts(tmp_path, asr_dir):
    broken = damaged_copy(asr_dir, tmp_path / "shar")
    (broken / "recording.000002.tar").unlink()
    with pytest.raises(SharLayoutError) as err:
        discover_dir(str(broken))
    msg = str(err.value)
    assert str(broken) in msg and "5 cuts shards but 4 recording shards" in msg and "000002" in msg


def test_field_lists_and_weighted_dirs(asr_dir, s2s_dir):
    fields = {
        "cuts": [str(p) for p in sorted(asr_dir.glob("cuts.*"))],
        "recording": [str(p) for p in sorted(asr_dir.glob("recording.*"))],
    }
    (shards, weight), *_ = discover_shards(fields)
    assert len(shards) == len(SHARD_SIZES) and weight == 1.0
    groups = discover_shards([[str(asr_dir), 3.0], str(s2s_dir)])
    assert [(len(s), w) for s, w in groups] == [(5, 3.0), (2, 1.0)]
    with pytest.raises(SharLayoutError, match="5 cuts shards but 4 recording shards"):
        discover_shards({**fields, "recording": fields["recording"][:4]})
    with pytest.raises(SharLayoutError, match="not a directory"):
        discover_shards(str(asr_dir / "nope"))


# ---------------------------------------------------------------------------------------------- plans


def test_epoch_order_is_seeded_per_epoch_and_tasks_cover_every_item_once(asr_dir):
    cfg = data_cfg(asr_dir, num_workers=3)
    plan = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=4)
    again = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=4)
    assert plan.epoch_order(1) == again.epoch_order(1)
    assert sorted(plan.epoch_order(0)) == sorted(plan.epoch_order(1)) != plan.epoch_order(0)
    items = sorted(i for t in range(plan.num_tasks) for i in plan.task_items(t))
    assert items == list(range(4 * len(SHARD_SIZES)))
    unbounded = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=None)
    assert unbounded.num_tasks <= 256 and unbounded.end_epoch >= 1000


# ---------------------------------------------------------------------------------------------- read tasks


def test_filters_are_counted_and_every_cut_is_batched_once(asr_dir):
    collate = RecordingCollator()
    cfg = data_cfg(asr_dir, num_workers=2, shuffle=False)
    stream = BatchStream(read_all(plan_dataset(TRAIN, cfg.train_ds, cfg, collate, epochs=1)))
    ids = [i for _, meta in stream for i in meta.ids]
    expected = expected_counts(asr_dir)
    assert len(ids) == len(set(ids)) == expected["cuts_batched"]
    for key in ("too_short", "too_long", "empty_text", "cuts_batched"):
        assert stream.totals[key] == expected[key], key
    assert stream.totals["shards_read"] == len(SHARD_SIZES) and stream.totals["cuts_read"] == sum(SHARD_SIZES)
    # The example contract: mono float32 resampled from 8 kHz to the dataset's 16 kHz.
    ex = collate.examples[0]
    assert set(ex) >= {"id", "duration", "audio", "text", "supervisions"}
    assert ex["audio"].dtype == np.float32 and ex["audio"].ndim == 1
    assert abs(len(ex["audio"]) - ex["duration"] * 16000) <= 2
    assert ex["text"] and ex["supervisions"][0]["text"] == ex["text"]


def test_s2s_source_and_target_audio_rates(s2s_dir):
    collate = RecordingCollator()
    # NeMo duplex configs set train_ds.sample_rate to the target rate; user audio stays at source_sample_rate.
    cfg = DataConfig(
        source_sample_rate=16000,
        target_sample_rate=22050,
        train_ds=DatasetConfig(shar_path=str(s2s_dir), sample_rate=22050, batch_size=2),
    )
    batches = [b for b, _ in BatchStream(read_all(plan_dataset(TRAIN, cfg.train_ds, cfg, collate, epochs=1)))]
    assert sum(len(b["ids"]) for b in batches) == 6
    for ex in collate.examples:
        assert abs(len(ex["audio"]) - ex["duration"] * 16000) <= 2
        assert abs(len(ex["target_audio"]) - ex["duration"] * 22050) <= 2
        assert [s["speaker"] for s in ex["supervisions"]] == ["user", "agent"]
    assert batches[0]["target_audio"].shape[0] == len(batches[0]["ids"])


def test_corrupt_shards_are_skipped_counted_and_fatal_in_strict_mode(tmp_path, asr_dir):
    broken = damaged_copy(asr_dir, tmp_path / "shar", (1, "recording"), (3, "cuts"))
    for shard in (1, 3):
        with pytest.raises(CorruptShardError, match=f"{shard:06d}"):
            read_shard(discover_dir(str(broken))[shard])
    cfg = data_cfg(broken, num_workers=2)
    stream = BatchStream(read_all(plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=1)))
    ids = [i for _, meta in stream for i in meta.ids]
    assert stream.totals["corrupt_shards"] == 2 and stream.totals["shards_read"] == 5
    good = expected_counts(asr_dir)["cuts_batched"]
    assert 0 < len(ids) < good and len(ids) == stream.totals["cuts_batched"]

    strict = data_cfg(broken, skip_corrupt=False, shuffle=False)
    plan = plan_dataset(TRAIN, strict.train_ds, strict, pad_audio_collator, epochs=1)
    with pytest.raises(CorruptShardError, match=r"recording\.000001\.tar.*skip_corrupt: true"):
        read_all(plan)


def test_unreadable_cut_is_skipped_and_counted(tmp_path, asr_dir):
    broken = damaged_copy(asr_dir, tmp_path / "shar")
    tar_path = broken / "recording.000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for i, (member, data) in enumerate(members):
            data = b"not audio at all" if i == 0 else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    cfg = data_cfg(broken, shuffle=False)
    stream = BatchStream(read_all(plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=1)))
    ids = [i for _, meta in stream for i in meta.ids]
    assert stream.totals["unreadable_cuts"] == 1 and "cut-000000" not in ids
    assert len(ids) == expected_counts(asr_dir)["cuts_batched"] - 1


def test_batchless_task_reports_its_counts_on_a_marker_row(tmp_path, asr_dir):
    broken = damaged_copy(asr_dir, tmp_path / "shar", (1, "recording"))
    cfg = DataConfig(
        validation_ds=ValidationConfig(
            datasets={"v": DatasetConfig(shar_path=str(broken), batch_size=2, num_workers=5, shuffle=False)}
        )
    )
    plan = plan_dataset("val_v", cfg.validation_ds.datasets["v"], cfg, pad_audio_collator, epochs=1, equal_split=False)
    stream = BatchStream(read_all(plan))  # task 1 reads only the corrupt shard: it has no batch to carry its count
    seen = Counter()
    for _, meta in stream:
        seen.update(meta.counters)
    assert stream.totals["corrupt_shards"] == 1
    assert seen["corrupt_shards"] + stream.pending["corrupt_shards"] == 1


def train_ranks(plan, world: int, steps: int | None, rows=None) -> tuple[list[tuple[int, str]], DataPosition]:
    """Train `world` ranks for `steps` steps each (None: to the end) on a plan's rows, dealt round robin as the
    equal split would; rows dealt but not consumed are lost with the worker group, like prefetched batches.
    Returns the (epoch, cut id) pairs consumed and the merged position a checkpoint would hold."""
    rows = read_interleaved(plan) if rows is None else rows
    ranks = [BatchStream(rows[r::world], start=plan.resume) for r in range(world)]
    consumed = []
    for stream in ranks:
        for _, meta in itertools.islice(stream, steps):
            consumed += [(meta.epoch, cut) for cut in meta.ids]
    return consumed, merge_positions([r.position for r in ranks])


def resumed_plan(cfg, position, epochs, collate=pad_audio_collator):
    position = DataPosition.from_dict(json.loads(json.dumps(position.to_dict())))  # as a checkpoint stores it
    return plan_dataset(TRAIN, cfg.train_ds, cfg, collate, epochs=epochs, start_position=position)


def test_a_resumed_stream_trains_every_cut_of_every_epoch_exactly_once(tmp_path, asr_dir):
    """Stop with batches in flight, resume with another world size and another num_workers, twice."""
    broken = damaged_copy(asr_dir, tmp_path / "shar", (1, "recording"))  # a corrupt audio tar: a replay must know
    cfg = data_cfg(broken, batch_size=None, batch_duration=4.0, use_bucketing=True, num_buckets=3, num_workers=2)
    first = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=6)
    consumed, position = train_ranks(first, world=2, steps=9)
    assert position.epoch == 1 and position.segments, "the test should stop inside the second epoch"

    cfg.train_ds.num_workers = 3  # an open epoch keeps its 2 lanes (one lane may run epochs ahead); later ones get 3
    collate = RecordingCollator()
    second = resumed_plan(cfg, position, epochs=6, collate=collate)
    assert second.tasks[0].lanes == 2 and second.tasks[-1].lanes == 3
    rows = read_interleaved(second)
    # A replay re-forms consumed batches from manifests: only the batches it emits are decoded and collated.
    emitted = Counter(cut for _, meta in BatchStream(rows) for cut in meta.ids)
    assert Counter(e["id"] for e in collate.examples) == emitted
    more, position = train_ranks(second, world=3, steps=4, rows=rows)
    consumed += more

    more, final = train_ranks(resumed_plan(cfg, position, epochs=6), world=1, steps=None)
    consumed += more
    good = _accepted_ids(asr_dir) - {c.id for c in read_shard(discover_dir(str(asr_dir))[1])}
    for epoch in range(6):
        ids = [cut for e, cut in consumed if e == epoch]
        assert sorted(ids) == sorted(good), f"epoch {epoch}: lost {good - set(ids)}, doubled {len(ids) - len(set(ids))}"
    assert final.epoch == 6 and not final.segments


def test_a_batch_that_decodes_to_nothing_still_completes_its_segment(tmp_path, asr_dir):
    broken = damaged_copy(asr_dir, tmp_path / "shar")
    tar_path = broken / "recording.000001.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for member, data in members:
            data = b"not audio" if member.name.endswith(".flac") else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    cfg = data_cfg(broken, batch_size=1, num_workers=1)
    plan = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=1)
    consumed, position = train_ranks(plan, world=1, steps=None)
    assert position.epoch == 1 and not position.segments, "batches without a row must not hold the epoch open"
    consumed, position = train_ranks(plan, world=1, steps=5)
    more, _ = train_ranks(resumed_plan(cfg, position, epochs=1), world=2, steps=None)
    ids = [cut for _, cut in consumed + more]
    undecodable = {c.id for c in read_shard(discover_dir(str(asr_dir))[1])}
    assert sorted(ids) == sorted(_accepted_ids(asr_dir) - undecodable)


def test_a_position_stays_small_and_survives_a_checkpoint(asr_dir):
    cfg = data_cfg(asr_dir, num_workers=2)
    plan = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=4)
    _, position = train_ranks(plan, world=2, steps=20)
    assert 1 <= position.epoch < 4
    assert {s.epoch for s in position.segments} <= {position.epoch, position.epoch + 1}
    # Two ranks take alternate batches, yet the union is a few ranges per segment (the ones in flight are holes).
    assert all(len(s.consumed) <= 3 for s in position.segments)
    assert DataPosition.from_dict(json.loads(json.dumps(position.to_dict()))) == position


def test_changed_data_restarts_the_open_epoch_only(asr_dir):
    cfg = data_cfg(asr_dir, num_workers=2)
    plan = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=2)
    _, position = train_ranks(plan, world=2, steps=8)
    assert position.epoch == 1
    cfg.train_ds.batch_size = 2  # other batches: batch numbers no longer name the same cuts
    resumed = resumed_plan(cfg, position, epochs=2)
    assert resumed.start_epoch == 1 and not resumed.resume.segments
    more, _ = train_ranks(resumed, world=2, steps=None)
    assert sorted(cut for e, cut in more) == sorted(_accepted_ids(asr_dir))  # epoch 1 again, from its start
    assert all(e == 1 for e, _ in more)


def test_a_resume_board_hands_read_tasks_the_restored_position_as_their_plan_can_use_it(asr_dir):
    cfg = data_cfg(asr_dir, num_workers=2)
    plan = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=2)
    board = ResumeBoard(plan)  # as the Ray actor does, in-process
    assert board.read() is None  # nothing published: read tasks go by the plan's own start
    _, position = train_ranks(plan, world=2, steps=3)
    assert board.publish(position) == position == board.read()
    fresh = board.publish(None)  # a worker group that restored no checkpoint
    assert (fresh.epoch, fresh.segments, fresh.fingerprint) == (0, (), plan.fingerprint)
    assert board.publish(replace(position, fingerprint="other data")).segments == ()


def test_batches_never_mix_epochs(asr_dir):
    """Buckets that never fill (a huge batch_duration) are flushed at the end of every epoch: a batch's number
    in its epoch's lane is all a resume needs, and a resume never re-reads an earlier epoch."""
    cfg = data_cfg(asr_dir, batch_size=None, batch_duration=200.0, use_bucketing=True, num_buckets=4)
    cfg.train_ds.bucket_buffer_size = 1000
    plan = plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=3)
    assert plan.num_tasks == 1  # one task reads all three epochs
    per_epoch: dict[int, list[str]] = {}
    for _, meta in BatchStream(read_all(plan)):
        per_epoch.setdefault(meta.epoch, []).extend(meta.ids)
    assert sorted(per_epoch) == [0, 1, 2]
    assert all(sorted(ids) == sorted(_accepted_ids(asr_dir)) for ids in per_epoch.values())


# ---------------------------------------------------------------------------------------------- Ray Data


def consume(iterators, limit: int | None = None) -> list[tuple[list[str], Counter]]:
    """Iterate every split in its own thread (as Train workers would); return (ids per batch, totals)."""
    results: list = [None] * len(iterators)

    def run(rank: int) -> None:
        stream = iterate_batches(iterators[rank])
        results[rank] = ([meta.ids for _, meta in stream], stream.totals)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(len(iterators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r is not None for r in results), "a consumer hung"
    return results


def test_equal_split_gives_every_rank_the_same_steps(ray_session, tmp_path, asr_dir):
    broken = damaged_copy(asr_dir, tmp_path / "shar", (2, "recording"))
    datasets = build_datasets(data_cfg(broken, num_workers=2), pad_audio_collator, max_epochs=2)
    (rank0, totals0), (rank1, totals1) = consume(datasets[TRAIN].streaming_split(2, equal=True))
    assert len(rank0) == len(rank1) > 0
    assert totals0["corrupt_shards"] + totals1["corrupt_shards"] == 2  # one per epoch, reported not hidden


def test_validation_sets_are_scored_exactly_once_across_ranks(ray_session, asr_dir, s2s_dir):
    cfg = DataConfig(
        train_ds=DatasetConfig(
            input_cfg=[InputConfig(shar_path=str(asr_dir)), InputConfig(shar_path=str(s2s_dir), weight=2.0)],
            batch_size=3,
            max_duration=6.0,
        ),
        validation_ds=ValidationConfig(
            datasets={
                "asr": DatasetConfig(shar_path=str(asr_dir), batch_size=2, num_workers=2, max_duration=6.0),
                "s2s": DatasetConfig(shar_path=str(s2s_dir), batch_size=4),
            }
        ),
    )
    datasets = build_datasets(cfg, pad_audio_collator, {"asr": pad_audio_collator, "val_s2s": pad_audio_collator})
    assert sorted(datasets) == ["train", "val_asr", "val_s2s"]
    config = ray_data_config(list(datasets))
    assert isinstance(config, SplitDataConfig) and config.equal == [TRAIN]
    per_rank = config.configure(
        {"val_asr": datasets["val_asr"]}, world_size=2, worker_handles=None, worker_node_ids=None
    )
    results = consume([per_rank[0]["val_asr"], per_rank[1]["val_asr"]])
    ids = [i for batches, _ in results for batch in batches for i in batch]
    assert len(ids) == len(set(ids)) == expected_counts(asr_dir)["cuts_batched"]


def test_validation_runs_while_the_training_stream_holds_every_cpu(ray_session, asr_dir, monkeypatch):
    """Mid-training validation: training read tasks are long-lived and keep their CPUs (paused ones too);
    validation must not wait for them."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from orchestrator.data import plan

    monkeypatch.setattr(plan, "MAX_READ_TASKS", 2)  # two training tasks that never finish in this test
    cfg = data_cfg(asr_dir, num_workers=2)
    cfg.validation_ds = ValidationConfig(shar_path=str(asr_dir), batch_size=4, max_duration=6.0)
    datasets = build_datasets(cfg, pad_audio_collator, max_epochs=None)
    train = iter(iterate_batches(datasets[TRAIN]))
    holder = None
    try:
        for _ in range(3):
            next(train)
        # Ray Data starts the second training task about a second after the first: wait until both hold their
        # CPU, or the booking below would take the CPU the second task is about to claim and never be ready.
        deadline = time.time() + 60
        while ray.available_resources().get("CPU", 0.0) > ray.cluster_resources()["CPU"] - 2:
            assert time.time() < deadline, "the training stream never ran its two read tasks"
            time.sleep(0.2)
        spare = ray.available_resources().get("CPU", 0.0)  # book every CPU the training stream left
        if spare > 0:  # a placement group reserves them without starting a process
            holder = placement_group([{"CPU": spare}])
            ray.get(holder.ready(), timeout=60)
        ((batches, _),) = consume([datasets["val_default"]])
        assert sum(map(len, batches)) == expected_counts(asr_dir)["cuts_batched"]
    finally:
        train.close()
        if holder is not None:
            remove_placement_group(holder)


def test_strict_mode_error_reaches_the_training_worker(ray_session, tmp_path, asr_dir):
    broken = damaged_copy(asr_dir, tmp_path / "shar", (0, "cuts"))
    ds = build_datasets(data_cfg(broken, skip_corrupt=False), pad_audio_collator, max_epochs=1)[TRAIN]
    with pytest.raises(Exception, match=r"cuts\.000000\.jsonl\.gz"):
        for _ in iterate_batches(ds):
            pass


# A package whose import can be held open: like torch/optim/__init__.py, its __init__ relies on the attribute
# that importing a submodule sets on the package, so a re-import after an interrupted one raises NameError.
SLOW_PACKAGE = {
    "__init__.py": "from .collate import SlowCollator  # noqa: F401\nfrom .slow import done  # noqa: F401\n\ndel collate\n",
    "collate.py": (
        "from orchestrator.testing import pad_audio_collator\n\n\n"
        "class SlowCollator:\n    def __call__(self, examples):\n        return pad_audio_collator(examples)\n"
    ),
    "slow.py": (
        "import os\nimport time\nfrom pathlib import Path\n\n"
        "gate = Path(os.environ.get('SLOWPKG_GATE', '/nonexistent'))\n"
        "if (gate / 'armed').exists():\n"
        "    (gate / 'armed').unlink()\n"
        "    (gate / 'importing').touch()\n"
        "    for _ in range(600):  # short sleeps: a cancellation is delivered between them\n"
        "        time.sleep(0.1)\n"
        "done = True\n"
    ),
}


def test_a_read_task_cancelled_while_importing_does_not_break_its_worker_process(
    ray_session, tmp_path, asr_dir, monkeypatch
):
    """Ray Data cancels in-flight read tasks when a stream shuts down (a Train worker group restart). A task
    cancelled while unpickling its plan leaves its process unable to import the collator's package; the
    next read task that Ray runs in that process must still deliver its batches."""
    import ray

    from orchestrator.data import datasets

    package = tmp_path / "slowpkg"
    package.mkdir()
    for name, text in SLOW_PACKAGE.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    import slowpkg

    cfg = data_cfg(asr_dir)
    plan_ref = ray.put(plan_dataset(TRAIN, cfg.train_ds, cfg, slowpkg.SlowCollator(), epochs=1))
    gate = tmp_path / "gate"
    gate.mkdir()
    # Its own runtime env: these tasks get a worker pool of their own, so the second reuses the first's process.
    env = {"env_vars": {"PYTHONPATH": str(tmp_path), "SLOWPKG_GATE": str(gate)}}

    @ray.remote(num_cpus=0.5, max_retries=3, runtime_env=env)  # Ray Data retries read tasks too
    def rows_of_first_read_task(box):
        return sum(table.num_rows for table in datasets._read_task_entry(box[0], 0))

    (gate / "armed").touch()
    cancelled = rows_of_first_read_task.remote([plan_ref])
    deadline = time.time() + 120
    while not (gate / "importing").exists():
        assert time.time() < deadline, "the read task never started importing the collator's package"
        time.sleep(0.1)
    ray.cancel(cancelled)
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(cancelled, timeout=60)

    rows = ray.get(rows_of_first_read_task.remote([plan_ref]), timeout=180)
    assert rows == sum(
        1 for _ in run_read_task(plan_dataset(TRAIN, cfg.train_ds, cfg, pad_audio_collator, epochs=1), 0)
    )


@pytest.mark.integration
def test_torch_trainer_gets_equal_steps_and_every_validation_cut_once(ray_session, tmp_path, asr_dir):
    """Through Ray Train v2 itself: SplitDataConfig on the trainer, a collective every step (a rank with one
    step more would hang), then one validation pass whose cuts are split over the ranks."""
    import ray.train
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    broken = damaged_copy(asr_dir, tmp_path / "shar", (2, "recording"))
    cfg = DataConfig(
        train_ds=DatasetConfig(shar_path=str(broken), batch_size=3, num_workers=2, max_duration=6.0),
        validation_ds=ValidationConfig(shar_path=str(broken), batch_size=2, max_duration=6.0),
    )
    datasets = build_datasets(cfg, pad_audio_collator, max_epochs=2)
    out = tmp_path / "ranks"
    out.mkdir()

    def loop(_config):
        import torch.distributed as dist

        train = iterate_batches(ray.train.get_dataset_shard("train"))
        steps = 0
        for _batch, _meta in train:
            steps += 1
            dist.barrier()
        val = iterate_batches(ray.train.get_dataset_shard("val_default"))
        ids = [i for _, meta in val for i in meta.ids]
        rank = ray.train.get_context().get_world_rank()
        (out / f"{rank}.json").write_text(json.dumps({"steps": steps, "ids": ids, "totals": dict(train.totals)}))
        ray.train.report({"steps": steps})

    TorchTrainer(
        loop,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=datasets,
        dataset_config=ray_data_config(datasets),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="data"),
    ).fit()
    ranks = [json.loads((out / f"{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert sum(r["totals"].get("corrupt_shards", 0) for r in ranks) == 2
    ids = ranks[0]["ids"] + ranks[1]["ids"]
    corrupt_ids = {c.id for c in read_shard(discover_dir(str(asr_dir))[2])}
    assert sorted(ids) == sorted(_accepted_ids(asr_dir) - corrupt_ids)


def _accepted_ids(shar_dir: Path, min_d: float = 0.1, max_d: float = 6.0) -> set[str]:
    ids = set()
    for path in sorted(shar_dir.glob("cuts.*.jsonl.gz")):
        for line in gzip.decompress(path.read_bytes()).decode().splitlines():
            cut = json.loads(line)
            text = " ".join(s["text"] for s in cut["supervisions"]).strip()
            if min_d <= cut["duration"] <= max_d and text:
                ids.add(cut["id"])
    return ids
