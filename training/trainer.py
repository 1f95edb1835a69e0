"""One training loop for every stage: a single CPU process, or torchrun with DDP (FSDP when the LLM is big).

- Parallelism: `torchrun --nproc_per_node=G` sets WORLD_SIZE/RANK/LOCAL_RANK; the loop joins the process
  group (NCCL on CUDA, gloo on CPU). With CUDA and world size > 1 the model is sharded with FSDP2
  (`fully_shard`, one unit per decoder layer) unless `fsdp: false`; otherwise it is wrapped in DDP.
- Precision: fp32 master weights; bf16 autocast on CUDA devices that support it (`precision: auto`).
- Gradient accumulation over `grad_accum` micro-batches (gradient sync on the last one only) and
  optional activation checkpointing of every decoder and encoder layer.
- Resumable: every `save_every` steps the trainable parameters, optimizer, scheduler, RNG states, step and
  data position go to `output_dir/state/step-N/` (written whole, then renamed into place) and
  `output_dir/state/latest` names it; a new run with the same output_dir continues from there and
  reaches the same parameters as an uninterrupted run.
- At the end the model (LoRA merged) is written as a plain OpenS2S folder to `output_dir/checkpoint`,
  with the tokenizer and config assets of the starting checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint as checkpoint_fn

from opens2s_edge.runtime.files import atomic_dir, write_text_atomic

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Batch, Collator, JsonlDataset
from .stages import (
    STAGES,
    FrozenGuard,
    LoRAConfig,
    StageModel,
    collator_needs,
    configure_stage,
    merge_lora_state_dict,
)


class ConfigError(ValueError):
    """The training configuration is incomplete or inconsistent."""


@dataclass
class TrainConfig:
    stage: str
    checkpoint: str  # OpenS2S folder the run starts from (and takes tokenizer/config assets from)
    data: list[str]  # jsonl files
    output_dir: str
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: only at the end
    keep_states: int = 1  # how many state folders to keep
    log_every: int = 10
    seed: int = 1
    precision: str = "auto"  # auto | bf16 | fp32
    activation_checkpointing: bool = False
    fsdp: str = "auto"  # auto (CUDA and world size > 1) | on | off
    lora: dict | None = None  # stage 3: {r, alpha, dropout, targets}
    text_weight: float = 1.0
    speech_weight: float = 1.0
    num_workers: int = 0
    feature_cache: int = 0  # audio feature LRU entries per process (small datasets repeat files)
    resume: bool = True
    save_final: bool = True
    num_threads: int = 0  # CPU intra-op threads; 0 keeps torch's default. 1 avoids spin-wait on a busy machine.

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        missing = [n for n in ("stage", "checkpoint", "data", "output_dir") if n not in d]
        if missing:
            raise ConfigError(f"config needs {', '.join(missing)}")
        d = dict(d)
        d["stage"] = str(d["stage"])
        if isinstance(d["data"], str):
            d["data"] = [d["data"]]
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        try:
            cfg = cls(**d)
            cfg.validate()
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"bad config value: {exc}") from exc
        return cfg

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.lora is not None and self.stage != "3":
            raise ConfigError("lora applies to stage 3 only")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if self.lr_schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"lr_schedule must be cosine, linear or constant, got {self.lr_schedule!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision must be auto, bf16 or fp32, got {self.precision!r}")
        if str(self.fsdp) not in ("auto", "on", "off", "True", "False"):
            raise ConfigError(f"fsdp must be auto, on or off, got {self.fsdp!r}")

    def lora_config(self) -> LoRAConfig | None:
        if self.lora is None:
            return None
        d = dict(self.lora)
        if "targets" in d:
            d["targets"] = tuple(d["targets"])
        try:
            return LoRAConfig(**d)
        except TypeError as exc:
            raise ConfigError(f"lora: {exc}") from exc


# -- distributed ------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local, device)


class ShardedSampler(torch.utils.data.Sampler):
    """Each epoch a fresh permutation (seed + epoch), dealt round-robin to ranks; `start` skips the
    micro-batches this rank already consumed, so a resumed run sees the same data order."""

    def __init__(self, n: int, rank: int, world: int, seed: int, epoch: int = 0, start: int = 0):
        self.n, self.rank, self.world, self.seed, self.epoch, self.start = n, rank, world, seed, epoch, start

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        # Pad by wrapping so every rank gets the same count (DDP needs equal step counts).
        per_rank = math.ceil(self.n / self.world)
        perm += perm[: per_rank * self.world - self.n]
        return perm[self.rank:: self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self.indices()) - self.start)


# -- schedule, state ----------------------------------------------------------------------------------------

def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape
    return f


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_state(output_dir: str | Path) -> Path | None:
    pointer = Path(output_dir) / "state" / "latest"
    if not pointer.is_file():
        return None
    path = Path(output_dir) / "state" / pointer.read_text().strip()
    return path if path.is_dir() else None


def _write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)


# -- the loop -----------------------------------------------------------------------------------------------

@dataclass
class StepLog:
    step: int
    loss: float
    parts: dict[str, float]
    lr: float
    tokens: int
    seconds: float


class Trainer:
    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print):
        cfg.validate()
        self.cfg = cfg
        self.dist = init_distributed()
        self._log = log
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        # Same seed on every rank while parameters are created (LoRA init): FSDP does not broadcast them.
        torch.manual_seed(cfg.seed)

        model = load_checkpoint(cfg.checkpoint, dtype=torch.float32, device=self.dist.device)
        model.train()
        self.lora = cfg.lora_config()
        self.trainable = configure_stage(model, cfg.stage, self.lora)
        self.guard = FrozenGuard(model)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model
        self.stage_model = StageModel(model, cfg.stage, cfg.text_weight, cfg.speech_weight)
        self.use_fsdp = self._want_fsdp()
        self.wrapped = self._wrap(self.stage_model)
        # From here on each rank draws its own dropout masks.
        torch.manual_seed(cfg.seed + self.dist.rank)
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)

        params = [p for p in self.stage_model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.autocast = self._autocast_dtype()

        self.dataset = JsonlDataset(cfg.data)
        self.collate = Collator(cfg.checkpoint, feature_cache=cfg.feature_cache, **collator_needs(cfg.stage))
        self.step = 0
        self.epoch = 0
        self.consumed = 0  # micro-batches of this epoch already used, on this rank
        self.history: list[StepLog] = []
        if cfg.resume:
            state = latest_state(self.out)
            if state is not None:
                self.load_state(state)
        n_train = sum(p.numel() for p in params)
        self.log(f"stage {cfg.stage}: {len(self.trainable)} trainable tensors ({n_train:,} values), "
                 f"{len(self.dataset)} rows, world {self.dist.world}, device {self.dist.device}, "
                 f"{'FSDP' if self.use_fsdp else 'DDP' if self.dist.world > 1 else 'single process'}, "
                 f"autocast {self.autocast}, starting at step {self.step}")

    def log(self, msg: str) -> None:
        if self.dist.main:
            self._log(f"[train] {msg}")

    # -- setup --
    def _want_fsdp(self) -> bool:
        mode = str(self.cfg.fsdp)
        if mode in ("on", "True"):
            if not dist.is_initialized():
                raise ConfigError("fsdp: on needs a process group (launch with torchrun)")
            return True
        if mode in ("off", "False"):
            return False
        return self.dist.world > 1 and self.dist.device.type == "cuda"

    def _wrap(self, module: StageModel) -> nn.Module:
        if self.use_fsdp:
            from torch.distributed.fsdp import fully_shard

            # One unit per decoder layer keeps only one layer's full weights live at a time; the root unit
            # takes the rest (embeddings, heads, adapter, projections).
            for lm in (self.model.llm_model, self.model.tts_lm_model):
                for layer in lm.model.layers:
                    fully_shard(layer)
            fully_shard(module)
            return module
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.local_rank] if self.dist.device.type == "cuda" else None
            # Stage 3 mixes speech and text-only rows: a batch without audio leaves the adapter unused.
            return DDP(module, device_ids=ids, find_unused_parameters=self.cfg.stage == "3")
        return module

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "fp32":
            return None
        if self.dist.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if p == "bf16":
            if self.dist.device.type == "cuda":
                raise ConfigError("precision bf16: this GPU does not support bfloat16")
            return torch.bfloat16  # CPU autocast supports bf16; asked for explicitly
        return None

    # -- data --
    def batches(self) -> Iterator[Batch]:
        while True:
            sampler = ShardedSampler(len(self.dataset), self.dist.rank, self.dist.world, self.cfg.seed,
                                     self.epoch, self.consumed * self.cfg.batch_size)
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=self.cfg.batch_size, sampler=sampler, collate_fn=self.collate,
                num_workers=self.cfg.num_workers, drop_last=False,
                # Its own generator: a loader drawing its base seed from the global RNG would shift the
                # dropout masks of a resumed run (the loader is re-created there, not in the original run).
                generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + self.epoch))
            for batch in loader:
                self.consumed += 1
                yield batch
            self.epoch += 1
            self.consumed = 0

    # -- training --
    def _sync_context(self, last: bool):
        import contextlib

        if self.use_fsdp:
            self.stage_model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.dist.world > 1 and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def train(self) -> list[StepLog]:
        cfg = self.cfg
        batches = self.batches()
        t0 = time.perf_counter()
        while self.step < cfg.max_steps:
            start = time.perf_counter()
            total, parts, tokens = 0.0, {}, 0
            for micro in range(cfg.grad_accum):
                batch = next(batches).to(self.dist.device)
                with self._sync_context(micro == cfg.grad_accum - 1):
                    with torch.autocast(self.dist.device.type, dtype=self.autocast or torch.float32,
                                        enabled=self.autocast is not None):
                        out = self.wrapped(batch)
                    (out.loss / cfg.grad_accum).backward()
                total += out.loss.item() / cfg.grad_accum
                for k, v in out.parts.items():
                    parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
                tokens += out.tokens
            self.guard.check()
            if self.dist.world > 1:
                # Log the mean over ranks, not rank 0's shard of the data.
                keys = sorted(parts)
                t = torch.tensor([total, tokens, *(parts[k] for k in keys)], dtype=torch.float64,
                                 device=self.dist.device)
                dist.all_reduce(t)
                total, tokens = t[0].item() / self.dist.world, int(t[1].item())
                parts = {k: t[2 + i].item() / self.dist.world for i, k in enumerate(keys)}
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.stage_model.parameters() if p.requires_grad],
                                               cfg.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            entry = StepLog(self.step, total, parts, lr, tokens, time.perf_counter() - start)
            self.history.append(entry)
            if self.dist.main:
                with open(self.out / "train_log.jsonl", "a") as f:
                    f.write(json.dumps(asdict(entry)) + "\n")
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                detail = " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                self.log(f"step {self.step}/{cfg.max_steps} loss {total:.4f} ({detail}) lr {lr:.2e} "
                         f"{tokens / max(entry.seconds, 1e-9):.0f} tok/s elapsed {time.perf_counter() - t0:.1f}s")
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save_state()
        if cfg.save_every:
            self.save_state()
        if cfg.save_final:
            self.save_final()
        return self.history

    # -- state --
    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(self.stage_model, self.optimizer, options=opts)
        trainable = set(self._trainable_keys())
        return {k: v for k, v in model_sd.items() if k in trainable}, optim_sd

    def _trainable_keys(self) -> list[str]:
        return [n for n, p in self.stage_model.named_parameters() if p.requires_grad]

    def save_state(self) -> Path:
        model_sd, optim_sd = self._state_dicts()
        # Data position differs per rank only by construction (same counts), so rank 0's is the run's.
        meta = {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "stage": self.cfg.stage,
                "world": self.dist.world}
        rng = [None] * self.dist.world
        if self.dist.world > 1:
            dist.all_gather_object(rng, _rng_state())
        else:
            rng = [_rng_state()]
        name = f"step-{self.step:08d}"
        root = self.out / "state"
        if self.dist.main:
            root.mkdir(parents=True, exist_ok=True)
            with atomic_dir(root / name) as tmp:
                torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                            "rng": rng, "meta": meta}, tmp / "state.pt")
                (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            _write_atomic(root / "latest", name + "\n")
            kept = sorted(p for p in root.glob("step-*") if p.is_dir())
            for old in kept[: max(0, len(kept) - self.cfg.keep_states)]:
                shutil.rmtree(old, ignore_errors=True)
            self.log(f"saved state {root / name}")
        if dist.is_initialized():
            dist.barrier()
        return root / name

    def load_state(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        meta = state["meta"]
        if meta["stage"] != self.cfg.stage:
            raise ConfigError(f"{path} holds stage {meta['stage']} state; this run is stage {self.cfg.stage}")
        if meta["world"] != self.dist.world:
            raise ConfigError(f"{path} was saved with world size {meta['world']}, this run has {self.dist.world}")
        missing = sorted(set(self._trainable_keys()) - set(state["model"]))
        if missing:
            raise ConfigError(f"{path} lacks trainable parameters {', '.join(missing[:5])}: different stage/LoRA?")
        set_state_dict(self.stage_model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"][self.dist.rank])
        self.step, self.epoch, self.consumed = meta["step"], meta["epoch"], meta["consumed"]
        self.log(f"resumed from {path} at step {self.step}")

    def save_final(self) -> Path | None:
        """The whole model, LoRA merged, as an OpenS2S folder (rank 0 writes it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.stage_model, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
        out = self.out / "checkpoint"
        if self.dist.main:
            prefix = "model."
            state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
            if self.lora is not None:
                state = merge_lora_state_dict(state, self.lora.scaling)
            dtype = _checkpoint_dtype(self.model.config.raw)
            model = load_checkpoint(self.cfg.checkpoint, dtype=torch.float32, device="cpu")
            model.load_state_dict(state, strict=True)
            save_checkpoint(model.to(dtype), out, assets_from=self.cfg.checkpoint, overwrite=True)
            self.log(f"wrote OpenS2S checkpoint {out}")
        if dist.is_initialized():
            dist.barrier()
        return out if self.dist.main else None


def _checkpoint_dtype(raw: dict) -> torch.dtype:
    name = str(raw.get("torch_dtype", "float32"))
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each decoder/encoder layer in the backward pass instead of keeping its activations.
    The layer's forward is replaced on the instance, so parameter names (and the checkpoint) are unchanged."""
    count = 0
    layer_lists = [model.llm_model.model.layers, model.tts_lm_model.model.layers]
    encoder_layers = getattr(model.audio_encoder_model, "layers", None)
    if isinstance(encoder_layers, nn.ModuleList):
        layer_lists.append(encoder_layers)
    for layers in layer_lists:
        for layer in layers:
            inner = layer.forward

            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():
                    return _inner(*args, **kwargs)
                return checkpoint_fn(_inner, *args, use_reentrant=False, **kwargs)

            layer.forward = forward
            count += 1
    return count


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
