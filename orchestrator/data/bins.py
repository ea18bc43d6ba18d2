"""`speechlm data estimate-bins`: bucket edges from a sample of a config's data (NeMo's `estimate_duration_bins.py`
and `estimate_token_bins.py` in one tool).

It reads the dataset the way training does (the same inputs, filters, prompt format and tokenizer, from the
manifests only: no audio is decoded) and measures each example as the config batches it: seconds, or with
`use_multimodal_sampling` tokens (text tokens + audio frames of `token_equivalent_duration`). 1-D: `num_buckets`
edges holding equal shares of the total, the last one the longest example seen. 2-D (`--sub-buckets`): NeMo's
[first, second] pairs, seconds or input tokens against output tokens, ready for `speechlm data plan-batches`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from orchestrator.data.bucketing import estimate_2d_bins, estimate_duration_bins

if TYPE_CHECKING:
    from orchestrator.config.schema import ExperimentConfig


@dataclass
class BinEstimate:
    """What estimate-bins found: the bins and the distribution they came from."""

    dataset: str
    measure: str  # duration | tokens | tokens_2d | duration_2d
    bins: list[Any]
    num_buckets: int
    examples: int
    dropped: dict[str, int] = field(default_factory=dict)
    quantiles: list[tuple[float, float]] = field(default_factory=list)  # of the first dimension

    def format(self) -> str:
        unit = "s" if self.measure.startswith("duration") else " tokens"
        lines = [f"[{self.dataset}] {self.examples} examples measured in {self.measure}"]
        if self.dropped:
            lines.append("  dropped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        lines.append("  " + "  ".join(f"p{round(q * 100)}={v:g}{unit}" for q, v in self.quantiles))
        lines.append("Use the following options in your config:")
        lines.append(f"  num_buckets: {self.num_buckets}")
        lines.append(f"  bucket_duration_bins: {_show(self.bins)}")
        if self.measure.endswith("2d"):
            lines.append("  bucket_batch_size: [...]  # one per bin: `speechlm data plan-batches` measures them")
        return "\n".join(lines)


def _show(bins: list[Any]) -> str:
    def number(x: float) -> str:
        return f"{x:g}" if isinstance(x, float) and not x.is_integer() else str(int(x))

    return (
        "["
        + ", ".join("[" + ", ".join(number(v) for v in b) + "]" if isinstance(b, list) else number(b) for b in bins)
        + "]"
    )


def _dataset_config(cfg: ExperimentConfig, dataset: str):
    from orchestrator.data.plan import TRAIN, VAL_PREFIX, validation_sets

    if dataset == TRAIN:
        return cfg.data.train_ds
    sets = validation_sets(cfg.data)
    name = dataset.removeprefix(VAL_PREFIX)
    if name not in sets:
        raise ValueError(f"--dataset {dataset!r} is not in the config; choose train or one of {sorted(sets)}")
    return sets[name]


def estimate_bins(
    cfg: ExperimentConfig,
    dataset: str = "train",
    num_buckets: int | None = None,
    sub_buckets: int | None = None,
    num_examples: int = 10000,
    seed: int = 0,
) -> BinEstimate:
    """Bins for `dataset` of `cfg` from up to `num_examples` examples of randomly chosen shards, drawn in proportion
    to the inputs' shares of the mix."""
    from orchestrator.data.examples import measure_lengths
    from orchestrator.data.inputs import read_records
    from orchestrator.data.plan import LengthRule, _inputs_of, _length_rule
    from speech_models.registry import build_collator

    ds = _dataset_config(cfg, dataset)
    num_buckets = num_buckets or ds.num_buckets
    inputs = _inputs_of(ds, cfg.data, dataset)
    base = _length_rule(ds)
    tokens = ds.use_multimodal_sampling
    measure = ("tokens_2d" if tokens else "duration_2d") if sub_buckets else ("tokens" if tokens else "duration")
    rule = LengthRule(measure, ds.token_equivalent_duration, ds.measure_total_length, ds.min_tokens, ds.max_tokens)
    collate = build_collator(cfg.model, cfg.data, ds) if rule.needs_tokens or base.needs_tokens else None
    if rule.needs_tokens and not callable(getattr(collate, "token_lengths", None)):
        raise ValueError(f"this model's collator cannot count tokens, so {measure} bins cannot be estimated")
    # Shards in proportion to the inputs' shares, as an epoch reads them (a repeated input's shards repeat).
    rng = random.Random(seed)
    shards = [
        (inp.shards[k % len(inp.shards)], inp) for inp in inputs for k in range(inp.reads_per_epoch) if inp.shards
    ]
    rng.shuffle(shards)
    values: list[Any] = []
    dropped: dict[str, int] = {}
    for shard, inp in shards:
        if len(values) >= num_examples:
            break
        for record in read_records(shard, inp.options, 0, with_audio=False):
            text_only = record.is_conversation and not record.audio_keys
            reason = None
            if not text_only and not ds.min_duration <= record.duration <= ds.max_duration:
                reason = "outside min/max_duration"
            elif not record.text:
                reason = "empty_text"
            lengths = None
            if reason is None and rule.needs_tokens:
                lengths = measure_lengths(record, inp, rule, collate)
                count = rule.token_count(lengths)
                if (ds.min_tokens is not None and count < ds.min_tokens) or (
                    ds.max_tokens is not None and count > ds.max_tokens
                ):
                    reason = "outside min/max_tokens"
            if reason is None and text_only and not tokens:
                reason = "text only (no duration): use use_multimodal_sampling"
            if reason is not None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            values.append(rule.key(record.duration, lengths))
            if len(values) >= num_examples:
                break
    if not values:
        raise ValueError(f"no example of {dataset} could be measured (dropped: {dropped}); check the data paths")
    if sub_buckets:
        bins: list[Any] = estimate_2d_bins(values, num_buckets, sub_buckets)
        first = sorted(v[0] for v in values)
    else:
        first = sorted(float(v) for v in values)
        bins = [round(b, 5) for b in estimate_duration_bins(first, num_buckets)]
        bins = [*bins, round(first[-1], 5)] if not bins or bins[-1] < first[-1] else bins
        if tokens:
            bins = [float(int(b)) for b in bins]
    quantiles = [(q, first[min(len(first) - 1, int(q * len(first)))]) for q in (0.01, 0.1, 0.5, 0.9, 0.99)]
    quantiles.append((1.0, first[-1]))
    return BinEstimate(dataset, measure, bins, len(bins), len(values), dropped, quantiles)
