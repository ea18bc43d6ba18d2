"""Helpers for tests, benchmarks and examples that need a real training run at toy scale (shipped, like
lhotse.testing, so every consumer builds the same thing)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from orchestrator.config import ExperimentConfig


def tiny_training_overrides(demo_dir: str | Path, run_dir: str | Path, max_steps: int = 6) -> list[str]:
    """Overrides that shrink configs/demo/salm.yaml to a seconds-long run on `tiny_demo` assets: a tiny encoder
    from random weights (not the shipped pretrained one, whose architecture these keys would contradict), and
    everything trains."""
    return [
        f"model.pretrained_llm={demo_dir}/llm",
        "model.pretrained_asr=null",
        "model.freeze_params=[]",
        "model.perception.encoder.n_layers=1",
        "model.perception.encoder.d_model=32",
        "model.perception.encoder.n_heads=2",
        "model.perception.encoder.subsampling_conv_channels=16",
        f"data.train_ds.input_cfg.0.shar_path={demo_dir}/asr/train",
        f"data.validation_ds.input_cfg.0.shar_path={demo_dir}/asr/val",
        "data.train_ds.batch_duration=12",
        "data.train_ds.bucket_buffer_size=40",
        "data.validation_ds.batch_size=8",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={min(3, max_steps)}",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "model.lr_scheduler.warmup_steps=1",
        f"exp_manager.explicit_log_dir={run_dir}",
    ]


def tiny_duplex_overrides(demo_dir: str | Path, run_dir: str | Path, max_steps: int = 4) -> list[str]:
    """Overrides that shrink configs/demo/s2s_duplex*.yaml to a seconds-long run on `tiny_demo` assets: a tiny
    encoder from random weights (not the shipped pretrained one) that trains, the codec frozen."""
    return [
        f"model.pretrained_llm={demo_dir}/llm",
        f"model.pretrained_audio_codec={demo_dir}/codec",
        "model.pretrained_asr=null",
        r"model.freeze_params=['^audio_codec\..+$']",
        "model.perception.encoder.n_layers=1",
        "model.perception.encoder.d_model=32",
        "model.perception.encoder.n_heads=2",
        "model.perception.encoder.subsampling_conv_channels=16",
        f"data.train_ds.input_cfg.0.shar_path={demo_dir}/s2s/train",
        f"data.validation_ds.datasets.demo_val.shar_path={demo_dir}/s2s/val",
        "data.train_ds.batch_duration=20",
        "data.train_ds.bucket_buffer_size=20",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={max(1, max_steps // 2)}",
        "trainer.log_every_n_steps=1",
        "trainer.limit_val_batches=1",
        "model.lr_scheduler.warmup_steps=1",
        f"exp_manager.explicit_log_dir={run_dir}",
    ]


def write_checkpoint(
    directory: str | Path, model: torch.nn.Module, cfg: ExperimentConfig, step: int = 0, metrics: dict | None = None
) -> Path:
    """Write `model` as a checkpoint exactly as the training loop's rank 0 does (`save_checkpoint`, with the
    optimizer `cfg` names): for tests, benchmarks, and bringing a model trained elsewhere into this format."""
    from orchestrator.config import to_yaml
    from orchestrator.storage.checkpoints import TrainingState, mark_complete, save_checkpoint
    from orchestrator.training.loop import setup_optimizer

    directory = Path(directory)
    optimizer, scheduler = setup_optimizer(model, cfg)
    state = TrainingState(step=step, metrics=dict(metrics or {}))
    save_checkpoint(directory, model, optimizer, scheduler, state, to_yaml(cfg), write_model=True, rank=0)
    mark_complete(str(directory))
    return directory


def pad_audio_collator(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """A model-free collator: right-padded audio plus lengths, ids and texts (tests, benchmarks)."""
    lens = np.array([len(e["audio"]) for e in examples], dtype=np.int64)
    audio = np.zeros((len(examples), int(lens.max())), dtype=np.float32)  # (B, T)
    for row, e in enumerate(examples):
        audio[row, : len(e["audio"])] = e["audio"]
    batch: dict[str, Any] = {
        "audio": audio,
        "audio_lens": lens,
        "ids": [e["id"] for e in examples],
        "text": [e["text"] for e in examples],
    }
    if all("target_audio" in e for e in examples):
        tlens = np.array([len(e["target_audio"]) for e in examples], dtype=np.int64)
        target = np.zeros((len(examples), int(tlens.max())), dtype=np.float32)  # (B, T_target)
        for row, e in enumerate(examples):
            target[row, : len(e["target_audio"])] = e["target_audio"]
        batch["target_audio"], batch["target_audio_lens"] = target, tlens
    return batch


class WordTokenCollator:
    """A model-free collator for every kind of example (plain cuts, conversations, text only): right-pads whatever
    audio the examples have and counts a text's tokens as its words, so that conversations, text-only data and
    token-aware batching are tested and benchmarked without a tokenizer. Picklable, like a model's collator."""

    def token_lengths(self, example: dict[str, Any], token_equivalent_duration: float | None):
        import math

        if "turns" in example:
            texts = [(t["role"], t.get("text", "")) for t in example["turns"] if "audio" not in t]
            answer = len(texts[-1][1].split()) if texts and texts[-1][0] == "assistant" else 0
            prompt = sum(len(text.split()) for _, text in texts) - answer + sum("audio" in t for t in example["turns"])
        else:
            prompt, answer = 1, len(example["text"].split())  # the audio's placeholder, then the transcript
        frames = sum(max(1, math.ceil(d / token_equivalent_duration)) - 1 for d in example.get("audio_durations", []))
        return (prompt + frames, answer, prompt + answer), None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        audios = [a for e in examples for a in (e["audios"] if "turns" in e else [e["audio"]])]
        lens = np.array([len(a) for a in audios], dtype=np.int64)
        audio = np.zeros((len(audios), int(lens.max(initial=0))), dtype=np.float32)  # (N_audio, T)
        for row, a in enumerate(audios):
            audio[row, : len(a)] = a
        return {
            "audio": audio,
            "audio_lens": lens,
            "ids": [e["id"] for e in examples],
            "text": [e["text"] for e in examples],
        }


class CutIdCollator:
    """The batch of a toy cut-counting model: a constant input per example and the cut ids it trains on."""

    def __init__(self, model_cfg, data_cfg, dataset_cfg):
        pass

    def __call__(self, examples):
        return {"x": np.ones((len(examples), 1), np.float32), "ids": [e["id"] for e in examples]}

    def prompt_defaults(self):
        from speech_models.config import PromptDefaults

        return PromptDefaults()


def cut_counter_entry(control_dir: str | Path, slots: int = 4096):
    """A toy model entry (`model_type: cut_counter`) that counts how often each cut was trained on, for
    exactly-once checks of the data pipeline through real runs, restarts and resumes.

    The counts live in a float64 buffer, `times_trained[<number at the end of the cut id> % slots]`, so they are
    saved with every checkpoint and rolled back with the weights when a run resumes from one: the last
    checkpoint's buffer is exactly what the surviving training history consumed. Checkpoints average floating
    buffers over DDP ranks, so each rank counts a cut `world size` times: the average is the sum over ranks,
    also across resumes with another number of workers.

    Pausing: training forward number N (counted per process) of a rank that finds `<control_dir>/pause_at_<N>`
    renames it to `paused_<pid>` (one rank wins) and sleeps, so a test can kill that worker or its driver at a
    chosen step. The classes are defined here, per call, so Ray pickles them by value with `control_dir`.
    """
    import os
    import time

    import torch
    from torch import nn

    from speech_models.registry import LOSS, ModelEntry

    control = Path(control_dir)

    class CutCounter(nn.Module):
        def __init__(self, cfg, data_cfg=None):
            super().__init__()
            self.cfg, self.head, self.forwards = cfg, nn.Linear(1, 1), 0
            self.register_buffer("times_trained", torch.zeros(slots, dtype=torch.float64))

        def forward(self, batch):
            self.forwards += 1
            pause = control / f"pause_at_{self.forwards}"
            if pause.exists():
                try:
                    pause.rename(control / f"paused_{os.getpid()}")
                except FileNotFoundError:  # another rank took it
                    pass
                else:
                    time.sleep(3600)
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            for cut_id in batch["ids"]:
                self.times_trained[int(cut_id.rsplit("-", 1)[1]) % slots] += world
            loss = self.head(batch["x"]).pow(2).mean()
            return {"loss": loss, "num_target_tokens": torch.tensor(len(batch["ids"]))}

        def validation_step(self, batch):
            loss = self.head(batch["x"]).pow(2).sum()
            return {"loss_sum": float(loss), "num_tokens": len(batch["ids"])}

    return ModelEntry("cut_counter", model=CutCounter, collator=CutIdCollator, metrics=(LOSS,))


# ----------------------------------------------------------------------------------------------
# A few training steps of a tiny SALM on a local process group (gloo), without Ray: strategies compared exactly
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRun:
    """One spawned run of `train_steps_on_process_group`: what every rank does."""

    llm_dir: str
    strategy: str  # "ddp" | "fsdp2" (a world of 1 runs unwrapped)
    world: int
    steps: int  # train up to this global step
    out: str  # JSON results, written by rank 0
    precision: str = "32"
    lora: bool = False  # LoRA on the LLM, with the encoder frozen too: frozen and trained weights share units
    activation_checkpointing: bool = False
    save_dir: str | None = None  # write a checkpoint (save_checkpoint + mark_complete) after the last step
    resume_from: str | None = None  # restore a checkpoint first (load_checkpoint), continue at its step
    port: int = 0  # of the gloo rendezvous; 0: a free one


def step_batch(collator: Any, rank: int, step: int, batch_size: int = 2) -> dict[str, Any]:
    """The batch of `rank` at global `step`: the same whatever the strategy or how the run was interrupted."""
    from speech_models.testing import DEFAULT_TINY_CORPUS

    rng = np.random.default_rng(1000 * step + rank)
    examples = []
    for i in range(batch_size):
        seconds = rng.uniform(0.4, 1.2)
        text = DEFAULT_TINY_CORPUS[int(rng.integers(len(DEFAULT_TINY_CORPUS)))]
        audio = (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)
        examples.append({"id": f"r{rank}s{step}b{i}", "audio": audio, "text": text})
    return collator(examples)


def _step_run_config(run: StepRun):
    from orchestrator.config import ExperimentConfig
    from speech_models.config import LoraConfig
    from speech_models.testing import tiny_salm_config

    overrides: dict[str, Any] = {"prompt_format": "plain"}
    if run.lora:
        overrides["lora"] = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        overrides["freeze_params"] = [r"^perception\.encoder\..+$"]
    model_cfg = tiny_salm_config(run.llm_dir, **overrides)
    model_cfg.optimizer = {"_target_": "torch.optim.AdamW", "lr": 3e-3, "betas": [0.9, 0.98]}
    cfg = ExperimentConfig(model=model_cfg)
    cfg.trainer.precision = run.precision
    cfg.trainer.strategy = run.strategy
    return cfg


def _step_run_worker(rank: int, run: StepRun) -> None:
    """One rank of `train_steps_on_process_group`: the training loop's own set-up and step, on fixed batches."""
    import json
    import os

    import torch
    import torch.distributed as dist

    from orchestrator.config import to_yaml
    from orchestrator.storage.checkpoints import (
        TrainingState,
        load_checkpoint,
        mark_complete,
        save_checkpoint,
        unwrap,
    )
    from orchestrator.training.loop import average_buffers, clip_gradients, setup_optimizer
    from orchestrator.training.parallel import full_parameters, wrap_for_distribution
    from speech_models.memory import apply_activation_checkpointing
    from speech_models.precision import setup_precision
    from speech_models.salm import SALM, SALMCollator

    torch.set_num_threads(1)
    if run.world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(run.port))
        dist.init_process_group("gloo", rank=rank, world_size=run.world)
    cfg = _step_run_config(run)
    torch.manual_seed(cfg.trainer.seed)
    device = torch.device("cpu")
    model = SALM(cfg.model)
    collator = SALMCollator(cfg.model, None, None)
    autocast = setup_precision(model, run.precision, device)
    if run.activation_checkpointing:
        apply_activation_checkpointing(model)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model = wrap_for_distribution(model, run.strategy, device, run.precision)
    optimizer, _ = setup_optimizer(model, cfg)
    state = TrainingState()
    if run.resume_from:
        state = load_checkpoint(Path(run.resume_from), model, optimizer, None, rank)

    seen: dict[str, str] = {}
    block = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))

    def record_dtype(module: Any, args: Any) -> None:
        seen.setdefault("compute_dtype", str(_weight(module).dtype))

    block.register_forward_pre_hook(record_dtype)

    losses = []
    while state.step < run.steps:
        model.train()
        with autocast():
            out = model(step_batch(collator, rank, state.step))
        out["loss"].backward()
        clip_gradients([p for p in model.parameters() if p.requires_grad], 1.0)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        seen.setdefault("grad_dtype", str(grads[0].dtype))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        loss = out["loss"].detach().float().reshape(1)
        if run.world > 1:
            dist.all_reduce(loss)
        losses.append(float(loss) / run.world)

    # One teacher-forced loss on a fixed batch with the final weights: what an export of them must reproduce.
    average_buffers(unwrap(model), run.world)  # as before every validation and checkpoint of the loop
    model.eval()
    with torch.no_grad(), full_parameters(model), autocast():
        final_loss = float(model(step_batch(collator, 0, 10_000))["loss"])
    units = _fsdp_unit_contents(model)
    trained_param = next(p for p in model.parameters() if p.requires_grad)
    frozen_after = _full_frozen(model, frozen_before)
    frozen_change = max((float((frozen_after[n] - v).abs().max()) for n, v in frozen_before.items()), default=0.0)
    if run.save_dir:
        directory = Path(run.save_dir)
        save_checkpoint(directory, model, optimizer, None, state, to_yaml(cfg), rank == 0, rank)
        if run.world > 1:
            dist.barrier()
        if rank == 0:
            mark_complete(str(directory))
    if rank == 0:
        result = {
            "losses": losses,
            "final_loss": final_loss,
            "start_step": run.steps - len(losses),
            "param_dtype": str(trained_param.dtype),
            "units": units,
            "frozen_change": frozen_change,
            **seen,
        }
        Path(run.out).write_text(json.dumps(result, indent=1))
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _weight(module: Any) -> Any:
    weight = module.base_layer.weight if hasattr(module, "base_layer") else module.weight
    return weight.to_local() if hasattr(weight, "to_local") else weight


def _fsdp_unit_contents(model: Any) -> list[dict[str, Any]]:
    """Per FSDP2 unit: its module and how many of its own parameters (not those of units inside it) are LoRA
    adapters, other trainable ones, and frozen ones."""
    from torch.distributed.fsdp import FSDPModule

    unit_names = [name for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    units = []
    for unit in unit_names:
        prefix = f"{unit}." if unit else ""
        inner = [n for n in unit_names if n != unit and n.startswith(prefix)]
        own = [
            (n, p)
            for n, p in model.named_parameters()
            if n.startswith(prefix) and not any(n.startswith(f"{i}.") for i in inner)
        ]
        if own:
            units.append(
                {
                    "module": unit or "<root>",
                    "lora": sum(1 for n, p in own if ".lora_" in n and p.requires_grad),
                    "trainable": sum(1 for n, p in own if ".lora_" not in n and p.requires_grad),
                    "frozen": sum(1 for _, p in own if not p.requires_grad),
                }
            )
    return units


def _full_frozen(model: Any, before: dict[str, Any]) -> dict[str, Any]:
    """The frozen parameters' whole values after training (gathered under FSDP2: a test-only collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {n: full[n] for n in before if n in full}


def train_steps_on_process_group(run: StepRun) -> dict[str, Any]:
    """Spawn `run.world` processes (gloo, CPU), train a tiny SALM the training loop's way on fixed per-rank
    batches (`step_batch`), and return rank 0's results: the loss of every step (averaged over ranks), the
    final loss on a fixed batch, the compute/param/grad dtypes seen, FSDP2 unit contents, how far frozen
    weights moved. Two strategies given the same `StepRun` otherwise must produce the same losses."""
    import json

    import torch.multiprocessing as mp

    if run.world > 1:
        if not run.port:
            import dataclasses
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                run = dataclasses.replace(run, port=s.getsockname()[1])
        mp.spawn(_step_run_worker, args=(run,), nprocs=run.world, join=True)
    else:
        _step_run_worker(0, run)
    return json.loads(Path(run.out).read_text())
