"""Typed schema of the `trainer`, `exp_manager` and `data` sections and of the whole experiment.

Key names and defaults follow NeMo speechlm2 (see `configs/`); this file is the only place defaults live.
Comments say how each NeMo/Lightning key maps onto Ray Train, Ray Data and MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from speech_models.config import ModelConfig

Precision = Literal["32", "32-true", "bf16-true", "bf16-mixed", "16-mixed", "16-true"]
Accelerator = Literal["cpu", "gpu", "cuda", "auto"]
Strategy = Literal["auto", "ddp", "fsdp2"]


@dataclass
class TrainerConfig:
    """Lightning-style trainer keys, mapped onto Ray Train's ScalingConfig and the worker loop."""

    devices: int = 1  # workers per node; -1 = every GPU of a node (needs accelerator gpu)
    num_nodes: int = 1  # Ray Train workers = devices x num_nodes
    accelerator: Accelerator = "auto"  # gpu/cuda -> ScalingConfig(use_gpu=True); auto = gpu when Ray has one
    precision: Precision = "32"
    logger: bool = False  # accepted for NeMo compatibility; MLflow is configured in exp_manager
    enable_checkpointing: bool = False  # accepted; checkpointing is exp_manager's job
    replace_sampler_ddp: bool = False  # accepted; Ray Data splits the data
    use_distributed_sampler: bool = False  # accepted; Ray Data splits the data
    max_epochs: int | None = None
    max_steps: int = 100000  # optimizer steps
    limit_train_batches: int | None = None  # NeMo's "epoch" size in steps
    log_every_n_steps: int = 10
    val_check_interval: int = 2000  # optimizer steps between validations (and checkpoints)
    limit_val_batches: int | None = None  # validation batches per dataset (None = the whole set)
    num_sanity_val_steps: int = 0  # accepted; not run
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = 1.0
    # "ddp" | "fsdp2", or NeMo's {_target_: lightning...DDPStrategy, ...} mapping (translated on load)
    strategy: Strategy = "ddp"
    # NeMo Automodel's key: recompute each LLM decoder layer, encoder Conformer layer and speech decoder layer in
    # the backward pass instead of keeping its activations (about a third more compute for those layers, and
    # activation memory of one layer instead of all; bench/README.md has the figures)
    activation_checkpointing: bool = False
    # Elastic training (spot nodes): the run starts with at least min_nodes x devices workers and grows to
    # num_nodes x devices as nodes come back; a lost node shrinks the worker group instead of stopping the run.
    # Each resize restarts the workers from the latest checkpoint. None: a fixed num_nodes x devices workers.
    min_nodes: int | None = None
    # Elastic: how often (seconds) a running worker group checks whether more nodes are back to grow into
    elastic_resize_interval_s: float = 60.0
    # Validate each checkpoint in a separate Ray task (on spare resources: a GPU or CPUs as a training worker
    # has) while the workers train on; its metrics reach MLflow and the checkpoint's ranking when it finishes.
    # False: every rank stops training to validate (the metrics are there at once, as sweep schedulers need).
    async_validation: bool = False
    cpus_per_worker: float | None = None  # None: 1 with GPUs; on CPU-only Ray, leave CPUs for Ray Data
    seed: int = 42


@dataclass
class CheckpointCallbackParams:
    """Maps onto ray.train.CheckpointConfig (save_top_k -> num_to_keep, monitor/mode -> score)."""

    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    save_top_k: int = 1
    filename: str = "{step}"
    # Upload checkpoints in a background thread while training goes on (Ray Train's CheckpointUploadMode.ASYNC);
    # the checkpoint counts once every rank's upload is done (complete.json), as with a synchronous upload
    async_save: bool = False
    every_n_train_steps: int | None = None
    every_n_epochs: int | None = None
    always_save_nemo: bool = False
    save_nemo_on_train_end: bool = False
    save_last: bool = True


@dataclass
class ExpManagerConfig:
    """Where a run lives (Ray RunConfig storage) and how it is tracked (MLflow)."""

    explicit_log_dir: str | None = None  # a local dir or fsspec URL; wins over exp_dir/name
    exp_dir: str | None = None  # run dir = exp_dir/name[/version] when explicit_log_dir is unset
    name: str = "speechlm"
    version: str | None = None
    use_datetime_version: bool = False
    resume_if_exists: bool = True
    resume_ignore_no_checkpoint: bool = True
    resume_from_checkpoint: str | None = None
    max_time_per_run: str | None = None  # accepted; Ray jobs are not time-sliced
    max_failures: int = 1  # worker failures survived per run (Ray FailureConfig)
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)
    create_mlflow_logger: bool = True
    # tracking_uri (default sqlite:///<run dir>/mlflow.db), experiment_name (default: name), run_name
    mlflow_logger_kwargs: dict[str, Any] = field(default_factory=dict)
    create_wandb_logger: bool = False  # accepted; not supported, warned about when true
    wandb_logger_kwargs: dict[str, Any] = field(default_factory=dict)
    create_tensorboard_logger: bool = False  # accepted; not supported, warned about when true


InputType = Literal[
    "lhotse_shar",
    "lhotse",
    "lhotse_as_conversation",
    "nemo",
    "nemo_tarred",
    "multimodal_conversation",
    "share_gpt",
    "txt",
    "txt_jsonl",
    "nemo_sft_jsonl",
    "group",
]


@dataclass
class InputConfig:
    """One entry of `input_cfg` (NeMo's lhotse input config); `orchestrator.data.inputs` lists what each type reads.

    Paths are local or fsspec URLs; `manifest_filepath`, `tarred_audio_filepaths`, `cuts_path` and `paths` take
    NeMo's sharded notation (`audio__OP_0..127_CL_.tar`) and lists.
    """

    type: InputType = "lhotse_shar"
    # a dir, a list of dirs (or NeMo's [dir, weight] pairs), an fsspec URL, or {field: [shard URLs]} for
    # object stores that cannot list
    shar_path: str | list[Any] | dict[str, list[str]] | None = None
    cuts_path: str | list[str] | None = None  # lhotse / lhotse_as_conversation: a cuts manifest or a Shar dir
    manifest_filepath: str | list[Any] | None = None  # nemo, nemo_tarred, multimodal_conversation, share_gpt
    tarred_audio_filepaths: str | list[Any] | None = None  # the audio tars of a tarred manifest
    paths: str | list[str] | None = None  # txt, txt_jsonl, nemo_sft_jsonl: the text files
    # The entry's share of the examples (NeMo: mixed in proportion to the weights, whatever the sizes).
    weight: float = 1.0
    audio_locator_tag: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)  # e.g. context / system_prompt for SALM prompts
    text_field: str = "text"  # nemo*, txt_jsonl: the key holding the text
    lang_field: str = "lang"  # nemo*: the key holding the language
    language: str | None = None  # txt: the language of the text (informational)
    audio_placeholders: str | list[str] | None = None  # share_gpt: marks of the audio in a turn (<sound>, <speech>)
    audio_root: str | None = None  # share_gpt: where relative `sound` paths live (default: the manifest's dir)
    skip_missing_manifest_entries: bool = False  # accepted (NeMo); tar members without an entry are always skipped
    input_cfg: list[InputConfig] = field(default_factory=list)  # type group: nested entries


@dataclass
class DatasetConfig:
    """Settings shared by train_ds, validation_ds and each named validation set."""

    sample_rate: int = 16000
    input_cfg: list[InputConfig] = field(default_factory=list)
    shar_path: str | list[Any] | dict[str, list[str]] | None = None  # shorthand for one lhotse_shar input
    prompt_format: str | None = None
    token_equivalent_duration: float | None = None
    seed: int = 42
    shard_seed: int | Literal["randomized", "trng"] = "randomized"
    shuffle: bool = True
    num_workers: int = 1  # Ray Data decode tasks in flight per dataset
    batch_size: int | None = None
    batch_duration: float | None = None  # seconds of audio per batch (dynamic batch size)
    use_bucketing: bool = False
    num_buckets: int = 30
    # Upper edges of the buckets: seconds (1-D), tokens (use_multimodal_sampling), or NeMo's 2-D
    # [[seconds or input tokens, output tokens], ...] (`speechlm data estimate-bins` makes them from a sample)
    bucket_duration_bins: list[float] | list[list[float]] | None = None
    bucket_batch_size: list[int] | None = None  # a fixed batch size per bucket (`speechlm data plan-batches`)
    bucketing_2d_strict_mode: bool = True  # 2-D: an example only goes to the sub-buckets of its first dimension
    bucket_buffer_size: int = 10000
    # Token-aware batching (NeMo's multimodal sampling): an example's length is its text tokens plus its audio
    # frames (one per token_equivalent_duration seconds); batches hold at most batch_tokens padded token slots.
    use_multimodal_sampling: bool = False
    batch_tokens: int | None = None
    quadratic_factor: float | None = None  # length L counts as L + L^2 / quadratic_factor (long examples cost more)
    measure_total_length: bool = True  # length = context + answer (decoder-only); False: context only
    min_tokens: int | None = None  # shorter examples are dropped and counted (too_few_tokens)
    max_tokens: int | None = None  # longer examples are dropped and counted (too_many_tokens)
    audio_locator_tag: str | None = None  # NeMo: propagated to every input_cfg entry
    min_duration: float = 0.1  # shorter cuts are dropped and counted (not applied to text-only examples)
    max_duration: float = 40.0  # longer cuts are dropped and counted
    skip_corrupt: bool = True  # False = strict mode: a corrupt shard or cut is fatal


@dataclass
class ValidationConfig(DatasetConfig):
    """validation_ds: shared settings plus one entry per named validation set."""

    batch_size: int | None = 1
    shuffle: bool = False
    # {name: {shar_path: ... | input_cfg: [...], plus any DatasetConfig key}}. As in NeMo, each named set
    # inherits every setting of validation_ds and may override it; the loader merges them before validation.
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)


@dataclass
class DataConfig:
    """The `data:` section; S2S extras are ignored by SALM."""

    frame_length: float = 0.08
    source_sample_rate: int = 16000
    target_sample_rate: int = 22050
    input_roles: list[str] = field(default_factory=lambda: ["user", "User"])
    output_roles: list[str] = field(default_factory=lambda: ["agent", "Assistant"])
    train_ds: DatasetConfig = field(default_factory=DatasetConfig)
    validation_ds: ValidationConfig | None = None


@dataclass
class ExperimentConfig:
    """A whole training run: what `speechlm train` and every sweep trial receive."""

    name: str = "speechlm"
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    data: DataConfig = field(default_factory=DataConfig)
