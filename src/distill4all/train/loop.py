"""The training loop, top to bottom. Everything that varies comes from `TrainConfig`.

    setup     accelerate (processes, mixed precision), tokenizer, model (+ LoRA), AdamW, the LR
              schedule; then the latest checkpoint, if a killed run left one
    each step the step's examples (a function of seed and step) → this process's micro-batches →
              forward + backward, gradients accumulated and synchronised on the last → clip →
              AdamW → LR schedule; loss and real-token throughput to metrics.jsonl
    every N   validation loss (also before the first step and after the last); checkpoint
    end       the adapter (LoRA) or the weights (full) + the tokenizer with the template, checked
              non-empty; summary.json

The loss is the mean over every target token of the global batch (not a mean of per-micro-batch
means), so accumulation, packing and the number of processes do not change what is optimised.

It runs the same in this process (one CPU/GPU) and under `accelerate launch` (DDP, FSDP,
DeepSpeed): see `worker.py` and docs/train.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from distill4all import atomic
from distill4all.config import TrainConfig
from distill4all.errors import StageError, StageFailure
from distill4all.layout import TrainLayout
from distill4all.models.chat_templates import hf_stop_ids
from distill4all.models.compat import make_v4_readable
from distill4all.train import checkpoint
from distill4all.train.batching import TeacherTopK, TokenizedSplit, collate, deal, step_examples, steps_per_epoch
from distill4all.train.metrics import MetricsLog, plot_loss, read_metrics
from distill4all.train.model import CausalLMLoss, load_model, load_tokenizer, mixed_precision

SUMMARY = "summary.json"
MODEL_INFO = "training.json"


@dataclass
class Job:
    """Everything a training process needs; the stage writes it as job.json for launched workers."""

    config: TrainConfig
    base_model: Path  # a local HF checkpoint
    data_dir: Path  # train/, val/ (tokenized) and tokenizer/ (with the template), from prepare
    out_dir: Path  # the stage folder: checkpoints/, metrics.jsonl, loss.png, model/, summary.json
    seed: int
    quiet: bool = False

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config.model_dump(mode="json"),
                "base_model": str(self.base_model),
                "data_dir": str(self.data_dir),
                "out_dir": str(self.out_dir),
                "seed": self.seed,
                "quiet": self.quiet,
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        return cls(
            TrainConfig.model_validate(d["config"]),
            Path(d["base_model"]),
            Path(d["data_dir"]),
            Path(d["out_dir"]),
            int(d["seed"]),
            bool(d["quiet"]),
        )


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    per_epoch = steps_per_epoch(n_train, cfg.global_batch_size)
    return cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup, then constant / cosine to 0 / linear to 0. Unlike transformers' schedules the
    first step already has a learning rate ((step + 1) / warmup): no optimizer step is spent at 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases and norm weights are not decayed (the usual AdamW split)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _configure_deepspeed(accelerator: Any, cfg: TrainConfig) -> None:
    """DeepSpeed wants batch sizes up front; ours come from the config, not from a DataLoader."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.accumulation_steps
    ds["train_batch_size"] = cfg.global_batch_size
    ds["gradient_clipping"] = cfg.max_grad_norm or 0.0


class Trainer:
    """The state of one training run in this process; `run()` is the loop."""

    def __init__(self, job: Job, console: Console | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.job = job
        cfg = self.cfg = job.config
        self.accelerator = acc = Accelerator(
            mixed_precision=mixed_precision(cfg.precision), gradient_accumulation_steps=cfg.accumulation_steps
        )
        if acc.num_processes != cfg.num_processes:
            raise StageError(
                f"train.num_processes is {cfg.num_processes} but {acc.num_processes} processes were launched; "
                "the global batch is split by the configured number"
            )
        self.main = acc.is_main_process
        self.precision = "fp32" if acc.mixed_precision == "no" else acc.mixed_precision
        quiet = job.quiet or not self.main
        self.console = console if (console is not None and self.main) else Console(stderr=True, quiet=quiet)
        set_seed(job.seed)

        self.train_data = TokenizedSplit.load(job.data_dir / "train")
        self.val_data = TokenizedSplit.load(job.data_dir / "val")
        self.train_lengths = np.asarray(self.train_data.lengths)
        self.train_targets = np.asarray(self.train_data.target_counts)
        # with distillation: the teacher's top-k at every training target, computed by the stage
        self.teacher = (
            TeacherTopK.load(TrainLayout(job.out_dir).teacher("train"), self.train_data) if cfg.distill else None
        )
        self.tokenizer = load_tokenizer(job.data_dir / "tokenizer")
        self.pad_id = int(self.tokenizer.pad_token_id)

        model = load_model(cfg, job.base_model, self.tokenizer, acc.mixed_precision)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.weight_decay), lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8
        )
        self.total = total_steps(cfg, len(self.train_data))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, cfg.warmup_steps, self.total, cfg.schedule)
        )
        _configure_deepspeed(acc, cfg)
        self.net, self.optimizer = acc.prepare(CausalLMLoss(model, cfg.distill), optimizer)
        # The scheduler is stepped by us once per optimizer step; accelerate's prepared scheduler
        # would step once per process. Its state goes into trainer_state.json, not into accelerate's
        # custom-object pickle: loading that would unpickle (run code from) a file in the run dir.
        if cfg.method != "full":
            checkpoint.keep_trainable_only(acc)

        self.ckpt_root = job.out_dir / "checkpoints"
        self.start, self.tokens_seen, self.train_seconds = 0, 0, 0.0
        last = checkpoint.latest(self.ckpt_root)
        if last is not None:
            self._resume(last)

    # --- pieces of the loop --------------------------------------------------------------------

    def _resume(self, path: Path) -> None:
        state = checkpoint.load(self.accelerator, path)
        expected = {"n_train": len(self.train_data), "global_batch_size": self.cfg.global_batch_size}
        found = {k: state.get(k) for k in expected}
        if found != expected or state.get("seed") != self.job.seed:
            raise StageError(f"checkpoint {path} was made with other data or settings; rerun with --force")
        self.start, self.tokens_seen, self.train_seconds = state["step"], state["tokens"], state["train_seconds"]
        self._restore_scheduler(state.get("scheduler"), self.start)
        self.console.print(f"train: resuming at step {self.start} of {self.total} from {path.name}")

    def _restore_scheduler(self, saved: dict[str, Any] | None, step: int) -> None:
        """The LR scheduler as it was at `step`: from its JSON state, or, for a checkpoint that has
        none, set to the step (its rate is a function of the step alone)."""
        if saved is not None:
            self.scheduler.load_state_dict({**saved, "lr_lambdas": [None] * len(self.scheduler.optimizer.param_groups)})
            return
        self.scheduler.last_epoch = step
        factor = lr_factor(step, self.cfg.warmup_steps, self.total, self.cfg.schedule)
        groups = self.scheduler.optimizer.param_groups
        for group, base in zip(groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor
        self.scheduler._last_lr = [g["lr"] for g in groups]

    def _inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.model_inputs().items()}

    def _collate(self, data: TokenizedSplit, ids: np.ndarray, teacher: TeacherTopK | None = None) -> Any:
        cfg = self.cfg
        return collate(
            data, ids, packing=cfg.packing, max_length=cfg.max_length, pad_id=self.pad_id,
            pad_to_max_length=cfg.pad_to_max_length, teacher=teacher,
        )  # fmt: skip

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over one global batch; returns its metrics row."""
        acc, cfg = self.accelerator, self.cfg
        t0 = time.perf_counter()
        ids = step_examples(step, len(self.train_data), cfg.global_batch_size, self.job.seed)
        targets = int(self.train_targets[ids].sum())
        # Each micro-batch's summed loss is scaled so that, after accelerate divides by the
        # accumulation steps and DDP averages over processes, the gradient is that of the mean
        # over all target tokens of the global batch.
        scale = acc.num_processes * cfg.accumulation_steps / max(targets, 1)
        micro_batches = deal(ids, self.train_lengths, acc.num_processes, cfg.accumulation_steps, cfg.group_by_length)
        loss_sum = torch.zeros((), device=acc.device)
        parts_sum = torch.zeros(2, device=acc.device)  # cross-entropy, KD
        self.net.train()
        for micro in micro_batches[acc.process_index]:
            with acc.accumulate(self.net):
                loss, _, parts = self.net(**self._inputs(self._collate(self.train_data, micro, self.teacher)))
                acc.backward(loss * scale)
            loss_sum += loss.detach().float()
            parts_sum += parts.float()
        grad_norm = acc.clip_grad_norm_(self.net.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = float(acc.reduce(loss_sum, "sum").item())
        ce_total, kd_total = (float(x) for x in acc.reduce(parts_sum, "sum").tolist())
        seconds = time.perf_counter() - t0
        tokens = int(self.train_lengths[ids].sum())
        self.tokens_seen += tokens
        self.train_seconds += seconds
        return {
            "step": step + 1,
            "epoch": round((step + 1) / steps_per_epoch(len(self.train_data), cfg.global_batch_size), 4),
            "loss": loss_total / max(targets, 1),
            **({"ce_loss": ce_total / max(targets, 1), "kd_loss": kd_total / max(targets, 1)} if cfg.distill else {}),
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": tokens,
            "target_tokens": targets,
            "tokens_per_s": round(tokens / seconds, 2),
            "seconds": round(seconds, 3),
        }

    def validate(self) -> float | None:
        """Mean loss per target token over the whole validation split, all processes together."""
        acc, data = self.accelerator, self.val_data
        if len(data) == 0:
            return None
        order = np.argsort(-np.asarray(data.lengths), kind="stable")  # similar lengths together
        per = acc.num_processes * math.ceil(len(data) / (acc.num_processes * self.cfg.micro_batch_size))
        groups = np.array_split(order, per)[acc.process_index :: acc.num_processes]
        totals = torch.zeros(2, device=acc.device, dtype=torch.float64)
        self.net.eval()
        with torch.no_grad():
            for g in groups:
                # Sharded models need every process in every forward: an empty share runs one
                # example and counts nothing.
                weight = 1.0 if len(g) else 0.0
                # cross-entropy only: the validation loss stays comparable with and without KD
                loss, count, _ = self.net(**self._inputs(self._collate(data, g if len(g) else order[:1])))
                totals += torch.stack([loss.double(), count.double()]) * weight
        self.net.train()
        totals = acc.reduce(totals, "sum")
        return float(totals[0] / totals[1]) if totals[1] > 0 else None

    def save_checkpoint(self, step: int) -> None:
        state = {
            "n_train": len(self.train_data), "global_batch_size": self.cfg.global_batch_size, "seed": self.job.seed,
            "total_steps": self.total, "tokens": self.tokens_seen, "train_seconds": self.train_seconds,
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
        }  # fmt: skip
        checkpoint.save(self.accelerator, self.ckpt_root, step, state, self.cfg.keep_checkpoints)

    def save_model(self) -> Path:
        """The trained model, gathered from every process (ZeRO-3/FSDP shards included)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.net)
        out = self.job.out_dir / "model"
        if self.main:
            inner = acc.unwrap_model(self.net).model
            state = {k.removeprefix("model."): v for k, v in state.items()}
            if self.cfg.method == "full":  # an adapter's loader computes them from its chat template
                inner.generation_config.eos_token_id = hf_stop_ids(self.tokenizer)
            with atomic.output_dir(out, replace=True) as tmp:
                inner.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                self.tokenizer.save_pretrained(tmp)
                info = {
                    "method": self.cfg.method, "base_model": str(self.job.base_model),
                    "template": self.template_name(), "max_length": self.cfg.max_length,
                    "train_on_inputs": self.cfg.train_on_inputs, "steps": self.total,
                    "trainable_parameters": self.trainable,
                }  # fmt: skip
                (tmp / MODEL_INFO).write_text(json.dumps(info, indent=2) + "\n")
                if self.cfg.method == "full":
                    make_v4_readable(tmp)
                check_saved_model(tmp, self.cfg.method)
        acc.wait_for_everyone()
        return out

    def template_name(self) -> str:
        meta = json.loads((self.job.data_dir / "meta.json").read_text())
        return str(meta["template"])

    # --- the loop ------------------------------------------------------------------------------

    def run(self, on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The loop; `on_log` sees every metrics row (the stage shows progress in `status` with it)."""
        cfg, out = self.cfg, self.job.out_dir
        metrics = MetricsLog(out / "metrics.jsonl", self.start) if self.main else None

        def log(row: dict[str, Any]) -> None:
            if metrics is not None:
                metrics.write(row)
                if on_log is not None:
                    on_log({**row, "total_steps": self.total})

        if self.start == 0:
            log({"step": 0, "val_loss": self.validate()})
        self.console.print(
            f"train: {self.cfg.method} on {self.job.base_model.name}, {self.trainable:,} trainable parameters, "
            f"{len(self.train_data)} train / {len(self.val_data)} val examples, {self.total} steps of "
            f"{cfg.global_batch_size} ({self.accelerator.num_processes} process(es) × {cfg.accumulation_steps} × "
            f"{cfg.micro_batch_size}), precision {self.precision}, "
            f"{'packed' if cfg.packing else 'padded'} rows of ≤{cfg.max_length} tokens"
        )
        columns = (
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        )  # fmt: skip
        with Progress(*columns, console=self.console, disable=self.console.quiet) as bar:
            task = bar.add_task("train", total=self.total, completed=self.start, loss="-", tps="-")
            recent: list[tuple[int, float]] = []
            try:
                for step in range(self.start, self.total):
                    row = self.train_step(step)
                    log(row)
                    recent = [*recent[-9:], (row["tokens"], row["seconds"])]
                    tps = sum(t for t, _ in recent) / sum(s for _, s in recent)
                    bar.update(task, advance=1, loss=f"{row['loss']:.4f}", tps=f"{tps:,.0f}")
                    done = step + 1
                    if done % cfg.eval_every == 0 or done == self.total:
                        log({"step": done, "val_loss": self.validate()})
                    if done % cfg.checkpoint_every == 0 and done < self.total:
                        self.save_checkpoint(done)
                        if self.main:
                            plot_loss(out / "metrics.jsonl", out / "loss.png")
            finally:
                if metrics is not None:
                    metrics.close()
        model_dir = self.save_model()
        summary = self.summary()
        if self.main:
            plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.method} · {self.job.base_model.name}")
            atomic.write_json(out / SUMMARY, summary)
            self.console.print(
                f"train: done, val loss {_fmt(summary['first_val_loss'])} → {_fmt(summary['last_val_loss'])}, "
                f"{summary['tokens_per_s']:,.0f} tokens/s; model in {model_dir}"
            )
        return summary

    def summary(self) -> dict[str, Any]:
        rows = read_metrics(self.job.out_dir / "metrics.jsonl") if self.main else []
        val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
        train = [r for r in rows if "loss" in r]
        kd = {f"last_{k}": train[-1][k] for k in ("ce_loss", "kd_loss") if train and k in train[-1]}
        return {
            "steps": self.total,
            "train_examples": len(self.train_data),
            "val_examples": len(self.val_data),
            "tokens": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 2),
            "tokens_per_s": round(self.tokens_seen / self.train_seconds, 2) if self.train_seconds else 0.0,
            "first_val_loss": val[0] if val else None,
            "last_val_loss": val[-1] if val else None,
            "best_val_loss": min(val) if val else None,
            "last_train_loss": train[-1]["loss"] if train else None,
            **kd,
            "trainable_parameters": self.trainable,
            "precision": self.precision,
            "processes": self.accelerator.num_processes,
        }


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def check_saved_model(folder: Path, method: str) -> None:
    """Refuse to hand on empty weights or an untrained adapter (a classic silent failure of LoRA saving)."""
    from safetensors import safe_open

    name = "adapter_model.safetensors" if method != "full" else "model.safetensors"
    files = [folder / name] if (folder / name).is_file() else sorted(folder.glob("model-*.safetensors"))
    if not files:
        raise StageFailure(f"training wrote no weights to {folder} ({name} is missing)")
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names = list(st.keys())
            if not names:
                raise StageFailure(f"the saved weights in {f} are empty")
            lora_b = [st.get_tensor(k) for k in names if "lora_B" in k]
        if method != "full" and (not lora_b or all(float(t.abs().max()) == 0.0 for t in lora_b)):
            raise StageFailure(f"the adapter in {folder} has no trained LoRA weights (all lora_B are zero)")


def train(
    job: Job, console: Console | None = None, on_log: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """Train, resuming from the latest checkpoint if there is one; returns the summary."""
    return Trainer(job, console).run(on_log)
