"""The training loop: single-process here, and every worker's loop under Ray Train (train/ passes its own
optimiser stepper, full-state checkpoint hooks and sharded validation).

AdamW with separate learning rates for the backbone, the token embeddings and the heads, warm-up + cosine
schedule, gradient clipping, validation every N steps with the best checkpoint kept, a progress bar. The
step budget and the validation steps come from one `Plan`, which train/ and tune/ use as well.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nezha.catalog import ItemCodes
from nezha.config import ConfigError
from nezha.data.split import Examples, Split
from nezha.decoding import SELECTION_ORDER, available_decoders
from nezha.device import resolve_device
from nezha.evaluation import rank_examples
from nezha.metrics import metrics_from_ranks, target_ranks
from nezha.model.checkpoint import create_model, save_checkpoint
from nezha.model.draft_head import TRANSITIONS
from nezha.model.model import ModelConfig, NezhaModel, check_ties, normalise_objectives
from nezha.model.tokens import build_prompts
from nezha.prepared import CATALOG_DIR, load_prepared
from nezha.verify.verifier import PrefixVerifier

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Train a NEZHA model (and/or its baselines) on a prepared dataset."""

    prepared: str = field(default="runs/prepared", metadata={"help": "output dir of `nezha prepare`"})
    out: str = field(default="runs/train", metadata={"help": "where best/ and last/ checkpoints go"})
    backbone: str = field(default="small", metadata={"help": "preset (tiny, small, 30m, 0.6b, 1b, 3b) or local HF dir"})
    transition: str = "rnn"
    objectives: list[str] = field(default_factory=lambda: ["nezha"],
                                  metadata={"help": "nezha, lm, mtp, joint (= nezha,lm); comma-separated"})
    placeholders: bool = field(default=True, metadata={
        "help": "false: the NEZHA-2 ablation (no <SP_l> in the prompt, the draft head reads h_0 only)"})
    tie_draft_embeddings: bool = field(default=False, metadata={
        "help": "ours, beyond the paper: the draft head's code embeddings are the LM's token embeddings of "
                "those codes (trained at embedding_lr_mult)"})
    tie_draft_heads: bool = field(default=False, metadata={
        "help": "ours, beyond the paper: the draft head's logit heads are the LM's token embeddings of each "
                "level's codes (trained at embedding_lr_mult)"})
    dtype: str = "float32"
    epochs: float = field(default=3.0, metadata={"help": "training budget (the LR schedule spans it)"})
    max_steps: int = field(default=0, metadata={"help": "stop after this many steps (0: run the epochs)"})
    batch_size: int = 128
    lr: float = 1e-3
    embedding_lr_mult: float = field(default=1.0, metadata={
        "help": "lr multiplier of the token embeddings (the input embedding and an untied LM head; the paper: 100)"})
    head_lr_mult: float = field(default=1.0, metadata={
        "help": "lr multiplier of the draft/MTP heads: transitions, logit heads, code embeddings (the paper: 10)"})
    weight_decay: float = 0.0
    warmup_ratio: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = field(default=0, metadata={"help": "validate every N steps (0: once per epoch)"})
    eval_users: int = field(default=2000, metadata={"help": "validation users per evaluation (0: all)"})
    eval_beam: int = 10
    select_by: str = field(default="auto", metadata={
        "help": "decoder whose validation NDCG@10 picks the best checkpoint (auto: nezha, else mtp, else beam)"})
    patience: int = field(default=0, metadata={
        "help": "stop after this many validations without a new best (0: run the whole budget)"})
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)"})
    progress: bool = True

    def __post_init__(self) -> None:
        if self.transition not in TRANSITIONS:
            raise ConfigError(f"transition: unknown transition {self.transition!r}; choose one of {TRANSITIONS}")
        try:
            normalise_objectives(self.objectives)
        except ValueError as exc:
            raise ConfigError(f"objectives: {exc}") from None
        check_ties(self)
        if self.select_by != "auto" and self.select_by not in SELECTION_ORDER:
            raise ConfigError(f"select_by: {self.select_by!r} is not auto or one of {SELECTION_ORDER}")
        for name in ("batch_size", "eval_beam", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_every", "eval_users", "patience", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: may not be negative, got {getattr(self, name)}")
        for name in ("lr", "embedding_lr_mult", "head_lr_mult"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.epochs <= 0 and not self.max_steps:
            raise ConfigError(f"epochs: must be > 0 (or give max_steps), got {self.epochs}")

    def model_config(self, codebook_sizes: Sequence[int]) -> ModelConfig:
        return ModelConfig(backbone=self.backbone, codebook_sizes=list(codebook_sizes), transition=self.transition,
                           objectives=list(self.objectives), dtype=self.dtype, placeholders=self.placeholders,
                           tie_draft_embeddings=self.tie_draft_embeddings, tie_draft_heads=self.tie_draft_heads)

    def plan(self, num_examples: int, world_size: int = 1) -> Plan:
        """This config's step budget and validation steps on `num_examples` training examples."""
        return plan(num_examples, batch_size=self.batch_size, epochs=self.epochs, max_steps=self.max_steps,
                    eval_every=self.eval_every, world_size=world_size)


@dataclass(frozen=True)
class Plan:
    """How many steps a run takes and which of them validate, as every rank counts them."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int

    def is_validation_step(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps


def plan(num_examples: int, *, batch_size: int, epochs: float, max_steps: int = 0, eval_every: int = 0,
         world_size: int = 1) -> Plan:
    """The step budget (`max_steps`, else `epochs` of whole batches per rank) and the validation interval
    (`eval_every`, else once per epoch) of a run on `num_examples` training examples."""
    epoch_steps = steps_per_epoch(num_examples, world_size, batch_size)
    total_steps = max_steps or max(1, math.ceil(epochs * epoch_steps))
    return Plan(epoch_steps, total_steps, eval_every or epoch_steps)


@dataclass
class TrainResult:
    best_checkpoint: Path
    last_checkpoint: Path
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]
    steps: int
    seconds: float
    examples_per_second: float


@dataclass
class LoopState:
    """Where the loop stands after a step: what a full-state checkpoint keeps beside the optimiser state.

    The data position is (epoch, batches of that epoch done); `train(resume=...)` continues from it.
    """

    step: int
    epoch: int
    batch_in_epoch: int
    running_loss: float
    loss: float  # this step's loss on this rank
    best: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    stale: int = 0


class Stepper(Protocol):
    """How one optimisation step happens: plain torch here, a DeepSpeed engine in train/."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def backward_and_step(self, loss: torch.Tensor) -> None: ...
    def current_lr(self) -> float: ...


def param_groups(model: NezhaModel, lr: float, embedding_lr_mult: float, head_lr_mult: float,
                 weight_decay: float) -> list[dict[str, Any]]:
    """Three groups by module identity (not by name matching): embeddings, heads, the rest of the backbone.

    "embeddings" is the whole input embedding matrix (and the LM head when it is not tied to it). With a
    preset backbone every row is one of our new tokens (base_vocab 0), the paper's "new token embeddings".
    With a pretrained vocabulary the base rows sit in that group too: our prompts never contain them, so
    the input side gives them no gradient, but a tied or separate LM head moves them through the `lm`
    softmax at the embeddings' rate. AdamW normalises gradients per element, so a gradient hook on the new
    rows alone would not change their step size; a per-row rate would need the optimiser's cooperation
    (DeepSpeed's included), which this grouping avoids. Draft-head weights tied to the vocabulary
    (`tie_draft_embeddings`, `tie_draft_heads`) are rows of that matrix, so they follow the embeddings' rate.
    """
    embeddings = {id(model.backbone.get_input_embeddings().weight)}
    output = model.backbone.get_output_embeddings()
    if output is not None:
        embeddings.add(id(output.weight))
    heads = {id(p) for head in (model.draft_head, model.mtp_head) if head is not None for p in head.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "embeddings": [], "heads": []}
    for param in model.parameters():  # parameters() yields tied weights once
        if not param.requires_grad:
            continue
        key = "embeddings" if id(param) in embeddings else "heads" if id(param) in heads else "backbone"
        groups[key].append(param)
    mult = {"backbone": 1.0, "embeddings": embedding_lr_mult, "heads": head_lr_mult}
    return [{"params": ps, "lr": lr * mult[k], "weight_decay": weight_decay, "name": k}
            for k, ps in groups.items() if ps]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length of an LR schedule over `total_steps` optimiser steps."""
    return max(1, int(total_steps * warmup_ratio))


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = warmup_steps(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class TorchStepper:
    def __init__(self, model: NezhaModel, cfg: TrainConfig, total_steps: int) -> None:
        self.model = model
        groups = param_groups(model, cfg.lr, cfg.embedding_lr_mult, cfg.head_lr_mult, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(total_steps, cfg.warmup_ratio))
        self.grad_clip = cfg.grad_clip

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def steps_per_epoch(num_examples: int, world_size: int, batch_size: int) -> int:
    """Optimiser steps in one epoch: every rank steps over whole batches of its share (= len(epoch_batches))."""
    return max(1, (num_examples // world_size) // batch_size)


BUCKET_BATCHES = 50  # batches per window of similar-length examples (see epoch_batches)


def length_buckets(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Positions into `lengths` sorted by length and cut into whole batches (a rest under batch_size is left out)."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                  bucket_batches: int = BUCKET_BATCHES) -> list[np.ndarray]:
    """One epoch of index batches for this rank: shuffled, then length-bucketed.

    Histories are mostly short but a batch pads to its longest, so each window of `bucket_batches`
    batches is sorted by length before it is cut; the batches are shuffled again afterwards. Every rank
    gets the same number of full batches (ranks must step together).
    """
    rng = np.random.default_rng(seed)
    per_rank = len(lengths) // world_size
    order = rng.permutation(len(lengths))[rank::world_size][:per_rank]
    window = batch_size * bucket_batches
    batches = []
    for first in range(0, per_rank, window):
        chunk = order[first : first + window]
        batches += [chunk[positions] for positions in length_buckets(lengths[chunk], batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


class ExampleBatch(NamedTuple):
    ids: np.ndarray  # the examples' indices in the split's train part
    histories: Sequence[np.ndarray]  # item indices, oldest first
    targets: np.ndarray


class TrainingData(Protocol):
    """Where the loop's training examples come from: the split in memory (InMemoryData) or a Ray Data stream
    (train/data.py). `batches(epoch)` yields this rank's batches of one epoch, every rank the same number
    (plan.steps_per_epoch: ranks step together)."""

    num_examples: int  # training examples over all ranks
    valid: Examples  # validation examples (all of them, or already the `eval_users` subset)

    def batches(self, epoch: int) -> Iterator[ExampleBatch]: ...


class InMemoryData:
    """The loaded split's training examples in `epoch_batches` order (seeded by seed + epoch)."""

    def __init__(self, split: Split, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.train, self.valid, self.num_examples = split.train, split.valid, len(split.train)
        self.lengths = split.train.histories.lengths()
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def batches(self, epoch: int) -> Iterator[ExampleBatch]:
        for idx in epoch_batches(self.lengths, self.batch_size, self.seed + epoch, self.rank, self.world_size):
            yield ExampleBatch(idx, self.train.histories[idx], self.train.targets[idx])


def make_batch(model: NezhaModel, catalog: ItemCodes, histories: Sequence[np.ndarray], targets: np.ndarray,
               device: torch.device | str) -> dict[str, torch.Tensor]:
    """Tensors for `NezhaModel.losses` from item-index histories and targets."""
    layout = model.layout
    history_codes = [catalog.codes[h] for h in histories]
    target_codes = catalog.codes[targets]
    batch = {"targets": torch.from_numpy(target_codes).to(device)}
    if model.draft_head is not None or model.mtp_head is not None:
        batch["draft_input_ids"], batch["draft_mask"] = build_prompts(
            layout, history_codes, model.prompt_has_placeholders, device)
    if "lm" in model.config.objectives:
        batch["lm_input_ids"], batch["lm_mask"] = build_prompts(
            layout, history_codes, False, device, suffix=layout.codes_to_tokens(target_codes))
    return batch


def validation_decoder(model: NezhaModel, select_by: str = "auto") -> str:
    """The decoder that scores a checkpoint: `select_by`, or for "auto" the first of SELECTION_ORDER it has."""
    served = available_decoders(model)
    if select_by == "auto":
        return next(d for d in SELECTION_ORDER if d in served)
    if select_by not in served:
        raise ValueError(f"select_by {select_by!r}: the model serves only {', '.join(served)} "
                         "(train the objective that decoder needs)")
    return select_by


def validate(model: NezhaModel, catalog: ItemCodes, verifier: PrefixVerifier, examples: Examples, beam: int,
             max_users: int = 0, batch_size: int = 256, decoder: str | None = None, rank: int = 0,
             world_size: int = 1) -> dict[str, float]:
    """hit/ndcg@1,5,10 on `max_users` validation users. With world_size > 1 every rank decodes every
    world_size-th user and the target ranks are gathered (torch.distributed), so all ranks get the
    metrics of the whole set."""
    examples = examples.subset(max_users)
    mine = Examples(examples.histories[rank::world_size], examples.targets[rank::world_size])
    ranks = np.empty(0, dtype=np.int64)
    if len(mine):
        was_training = model.training
        model.eval()
        ranked, _invalid = rank_examples(model, decoder or validation_decoder(model), catalog, verifier, mine, beam,
                                         batch_size=batch_size)
        model.train(was_training)
        ranks = target_ranks(ranked, catalog.packed[mine.targets])
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, ranks)
        ranks = np.empty(len(examples), dtype=np.int64)
        for r, part in enumerate(gathered):
            ranks[r::world_size] = part  # back in the users' order: the same metrics as one process
    return metrics_from_ranks(ranks, ks=(1, 5, 10))


def train(cfg: TrainConfig, *, stepper_factory: Callable[[NezhaModel, Plan], Stepper] | None = None,
          rank: int = 0, world_size: int = 1,
          on_evaluation: Callable[[dict[str, Any], Path | None], None] | None = None,
          resume: Callable[[], LoopState | None] | None = None,
          on_step: Callable[[LoopState], None] | None = None,
          shard_validation: bool = False, data: TrainingData | None = None) -> TrainResult:
    """Train on `cfg.prepared`; rank 0 keeps the validation history and writes `out/best` (by validation
    NDCG@10) and `out/last`.

    `stepper_factory(model, plan)` replaces plain AdamW (train/ passes a DeepSpeed engine);
    `on_evaluation(metrics, best_checkpoint_or_None)` is called on rank 0 after each validation.
    The distributed trainer also passes `resume()` (called once the stepper exists: the state of a loaded
    full-state checkpoint, or None), `on_step(state)` (every rank, after each step and its validation) and
    `shard_validation` (every rank scores a slice of the validation users instead of rank 0 all of them).
    `data` replaces the split loaded into memory (train/ streams it from Ray Data); the catalog's codes are
    still read from `cfg.prepared` (`ItemCodes`: without the ids and titles, which training never reads).
    """
    if cfg.patience and world_size > 1:
        # Rank 0 alone decides an early stop; the other ranks would be left waiting in a collective.
        raise ConfigError("patience (early stopping) needs a single worker; the distributed trainer runs its budget")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    catalog_dir = Path(cfg.prepared) / CATALOG_DIR
    catalog: ItemCodes
    if data is None:
        catalog, split, _quantizer = load_prepared(cfg.prepared)
        data = InMemoryData(split, cfg.batch_size, cfg.seed, rank, world_size)
    else:
        catalog = ItemCodes.load(catalog_dir)  # codes only: the ids and titles are most of a large catalog
    model = create_model(cfg.model_config(catalog.codebook_sizes), seed=cfg.seed).to(device)
    model.train()
    verifier = catalog.verifier(device)
    selector = validation_decoder(model, cfg.select_by)

    per_rank = data.num_examples // world_size
    run_plan = cfg.plan(data.num_examples, world_size)
    epoch_steps, total_steps = run_plan.steps_per_epoch, run_plan.total_steps
    stepper = stepper_factory(model, run_plan) if stepper_factory else TorchStepper(model, cfg, total_steps)
    out = Path(cfg.out)
    best_dir, last_dir = out / "best", out / "last"
    log.info("training %s on %d examples (%d per rank, %d ranks): %d steps of %d, device %s, decoders %s, "
             "checkpoints picked by %s", cfg.backbone, data.num_examples, per_rank, world_size, total_steps,
             cfg.batch_size, device, ",".join(available_decoders(model)), selector)

    history: list[dict[str, Any]] = []
    best: dict[str, float] = {}
    extra = {"train_config": asdict(cfg), "prepared": str(Path(cfg.prepared).resolve())}
    start = time.perf_counter()
    seen = 0
    step = 0
    epoch = 0
    skip = 0  # batches of the first epoch already trained (a resumed run)
    running = 0.0
    stale = 0  # validations since the last new best (early stopping)
    state = resume() if resume else None
    if state is not None:
        # The last batch of an epoch is the start of the next one.
        position = (state.epoch + 1, 0) if state.batch_in_epoch == epoch_steps else (state.epoch, state.batch_in_epoch)
        if position != divmod(state.step, epoch_steps):
            raise ConfigError(f"the checkpoint stopped at step {state.step} = epoch {state.epoch} batch "
                              f"{state.batch_in_epoch}, which is not where this run's {epoch_steps} batches per "
                              "epoch put it: resume with the batch size and number of workers it was saved with")
        step, (epoch, skip) = state.step, position
        running, best, history, stale = state.running_loss, dict(state.best), list(state.history), state.stale
        log.info("resumed at step %d (epoch %d, batch %d)", step, epoch, skip)
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=not cfg.progress or rank != 0,
               dynamic_ncols=True)
    stopped_early = False
    while step < total_steps:
        for batch_in_epoch, examples in enumerate(islice(data.batches(epoch), skip, None), start=skip + 1):
            batch = make_batch(model, catalog, examples.histories, examples.targets, device)
            losses = stepper.forward(batch)
            stepper.backward_and_step(losses["loss"])
            step += 1
            seen += len(examples.targets)
            loss_value = float(losses["loss"].detach())  # one sync per step, for the log and the bar
            running = loss_value if step == 1 else 0.95 * running + 0.05 * loss_value
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{stepper.current_lr():.2e}")
            if rank == 0 and step % cfg.log_every == 0:
                rate = seen * world_size / (time.perf_counter() - start)
                log.info("step %d/%d loss %.4f (%s) lr %.2e %.0f examples/s", step, total_steps, running,
                         " ".join(f"{k} {float(v.detach()):.3f}" for k, v in losses.items() if k != "loss"),
                         stepper.current_lr(), rate)
            validating = run_plan.is_validation_step(step)
            if validating and (rank == 0 or shard_validation):
                shards = world_size if shard_validation else 1
                metrics = validate(model, catalog, verifier, data.valid, cfg.eval_beam, cfg.eval_users,
                                   decoder=selector, rank=rank % shards, world_size=shards)
            if rank == 0 and validating:
                record = {"step": step, "epoch": step / epoch_steps, "loss": running,
                          "seconds": time.perf_counter() - start, "decoder": selector, **metrics}
                history.append(record)
                improved = not best or metrics["ndcg@10"] > best["ndcg@10"]
                stale = 0 if improved else stale + 1
                if improved:
                    best = dict(record)
                    save_checkpoint(model, best_dir, catalog_dir, {**extra, "validation": record})
                log.info("validation at step %d: %s%s", step,
                         " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), " (best)" if improved else "")
                if on_evaluation:
                    on_evaluation(record, best_dir if improved else None)
                if cfg.patience and stale >= cfg.patience:
                    log.info("early stop at step %d: %d validations without a new best", step, stale)
                    stopped_early = True
            if on_step:
                on_step(LoopState(step, epoch, batch_in_epoch, running, loss_value, dict(best), list(history), stale))
            if step >= total_steps or stopped_early:
                break
        epoch += 1
        skip = 0
        if stopped_early:
            break
    bar.close()
    seconds = time.perf_counter() - start
    if rank == 0:
        save_checkpoint(model, last_dir, catalog_dir, {**extra, "steps": step})
        (out / "history.json").write_text(json.dumps(history, indent=2))
    rate = seen * world_size / seconds
    # only rank 0 keeps the best validation (the other ranks score a slice of it, or none)
    best_note = f"; best validation ndcg@10 {best['ndcg@10']:.4f}" if "ndcg@10" in best else ""
    log.info("trained %d steps in %.1f s (%.0f examples/s)%s", step, seconds, rate, best_note)
    return TrainResult(best_dir, last_dir, best, history, step, seconds, rate)
