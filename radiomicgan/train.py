"""Training: RadiomicGAN with Dynamic Window-based Training, and the baselines on the same data.

One epoch is ``steps_per_epoch`` optimisation steps on random paired crops (slices are sampled, so "epoch" is
the unit DWT counts in). After each epoch: the generator accuracy (fraction of discriminator patches that call
synthesized images standard, the reading of the paper's "model accuracy" taken from the authors' GANai code)
drives fixed growing; Grad-CAM hot spots drive dynamic selection; validation PSNR is measured on whole slices;
the model folder is rewritten atomically, so a cancel or a crash leaves the last complete epoch loadable.

Beyond one GPU: ``torchrun --nproc_per_node N -m radiomicgan.cli train ...`` trains with DistributedDataParallel
(gloo on CPU, NCCL on CUDA); rank 0 writes the model folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .dataset import Manifest, SliceSampler, load_manifest
from . import methods
from .card import DataRecord, ModelCard, TrainingRecord, ValidationRecord
from .errors import TrainingError
from .metrics import psnr
from .modelio import (
    CARD_NAME,
    CHECKPOINT_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    atomic_torch_save,
    build_networks,
    resolve_device,
    safe_load,
)
from .settings import TrainConfig
from .staging import on_interrupt, staged, write_fault
from .window import WindowSchedule, apply_window, growing_steps_per_window, select_window, window_weight
from .jobs import CAM_PLOT, CAM_SAMPLES, CANCEL_NAME, LOG_NAME, WINDOWS_PLOT  # noqa: E402,F401  (shared with the programs that read them)

__all__ = ["TrainConfig", "TrainingError", "train"]  # TrainConfig: every setting, defined in radiomicgan.settings


# ---------------------------------------------------------------------------------------------- helpers


class Cancel:
    """Stop at the next step on Ctrl-C or when a flag file appears (for programs that launch training)."""

    def __init__(self, flag_file: Path | None):
        self.flag_file = flag_file
        self.requested = False
        self._interrupts = on_interrupt(self._on_signal)

    def __enter__(self):
        self._interrupts.__enter__()
        return self

    def __exit__(self, *exc):
        return self._interrupts.__exit__(*exc)

    def _on_signal(self):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nradiomicgan: stopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)

    def __call__(self) -> bool:
        if self.flag_file is not None and self.flag_file.exists():
            self.requested = True
        return self.requested


class _Distributed:
    """torchrun's environment -> a process group; a no-op for one process."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        # launched by torchrun (even with one process): a real process group and DDP, so that path is what runs
        self._active = self.world_size > 1 or "TORCHELASTIC_RUN_ID" in os.environ
        if self._active and not dist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if device == "cuda":
                import torch

                self.device = f"cuda:{self.local_rank}"
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend)

    @property
    def active(self) -> bool:
        return self._active

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.startswith("cuda") else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def gather(self, value: float) -> list[float]:
        if not self.active:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def close(self):
        if self.active:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def _split(manifest: Manifest, val_slices: int) -> tuple[Manifest, list[tuple[np.ndarray, np.ndarray]], str]:
    """Hold out the last pair for validation when there are several; otherwise validate on the training pair
    (and say so in the card)."""
    if len(manifest.pairs) > 1:
        train = Manifest(manifest.path, manifest.pairs[:-1], manifest.info)
        held = SliceSampler(Manifest(manifest.path, manifest.pairs[-1:], manifest.info), crop=None)
        label = f"held-out pair '{manifest.pairs[-1].id}'"
    else:
        train = manifest
        held = SliceSampler(manifest, crop=None)
        label = "the training pair (only one pair given)"
    slices = [(s, t) for _, _, s, t in held.slices()]
    step = max(1, len(slices) // val_slices)
    return train, slices[::step][:val_slices], label


def _check_pair_sizes(manifest: Manifest, train_set: Manifest, sampler: SliceSampler, val, method) -> None:
    """Every pair, the held-out one included (validated and Grad-CAM-sampled on whole slices), against the method's
    minimum slice size, before any step: a smaller pair is named instead of failing deep inside instance norm."""
    if not method.min_crop:
        return
    sizes = [(pair, source.shape[1:]) for pair, (source, _) in zip(train_set.pairs, sampler.volumes)]
    held = [p for p in manifest.pairs if p not in train_set.pairs]
    sizes += [(held[0], val[0][0].shape)] if held and val else []
    m = method.min_crop
    for pair, (rows, cols) in sizes:
        if min(rows, cols) < m:
            role = "held-out pair" if pair in held else "pair"
            raise TrainingError(f"{pair.source}: {role} '{pair.id}' has slices of {rows}x{cols} pixels; {method.name} needs at least "
                                f"{m}x{m} (smaller, its discriminator shrinks to 1x1); remove the pair or give it at a larger size")


def _versions() -> dict:
    import torch
    import torchvision

    return {"radiomicgan": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__}


def validation_psnr(model: LoadedModel, slices, spacing, device: str) -> tuple[float, float]:
    """Mean PSNR of harmonized and of input against target over whole validation slices."""
    from .harmonize import harmonize_hu

    sources = np.stack([s for s, _ in slices]) if len({s.shape for s, _ in slices}) == 1 else None
    outs = harmonize_hu(model, sources, spacing, device) if sources is not None else [
        harmonize_hu(model, s, spacing, device) for s, _ in slices]
    model_psnr = float(np.mean([psnr(t, o) for (_, t), o in zip(slices, outs)]))
    input_psnr = float(np.mean([psnr(t, s) for s, t in slices]))
    return model_psnr, input_psnr


# ---------------------------------------------------------------------------------------------- training


def train(
    pairs: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    progress: bool | None = None,
    cancel_file: Path | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> ModelCard:
    """Train and write a model folder; returns the card. ``on_epoch`` receives each epoch's record."""
    config.check()
    manifest = load_manifest(pairs)
    out = Path(out)
    created = not out.exists()
    try:
        if not methods.get(config.method).network:
            return _fit_closed_form(manifest, out, config)
        card = _train_network(manifest, out, config, resume, progress, cancel_file, on_epoch)
        if created and card.training.status == "cancelled" and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # cancelled before a first epoch, in a folder this run made: leave nothing
        return card
    except BaseException:
        if created and out.is_dir() and not (out / CARD_NAME).exists():  # failed before any model existed
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _run_files() -> tuple[str, ...]:
    """The names a training run writes into its model folder."""
    from .card import CARD_MD

    return (CARD_NAME, CARD_MD, WEIGHTS_NAME, CHECKPOINT_NAME, LOG_NAME, CANCEL_NAME, CAM_SAMPLES, WINDOWS_PLOT, CAM_PLOT)


def _prepare_output(out: Path, resume: bool, config: TrainConfig, kernels=(None, None)) -> None:
    """Called with the output's lock held (the command line's ``command_lock``): no other run writes here, so what
    killed runs staged under our names is removed, and a folder whose run was killed before its first epoch ended
    (no model card: nothing to resume) is taken over by a new run when it holds only a run's own files."""
    from .jobs import staged_leftovers

    names = _run_files()
    if out.is_dir():
        for leftover in (p for name in names for p in staged_leftovers(out / name)):
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
    if resume:
        from .resume import check_resume

        check_resume(out, config, kernels)  # a damaged folder, other settings or kernel direction: one line
    elif out.exists() and any(p.name != CANCEL_NAME for p in out.iterdir()):
        entries = list(out.iterdir())
        if (out / CARD_NAME).exists() or not all(p.is_file() and not p.is_symlink() and p.name in names for p in entries):
            raise TrainingError(f"{out}: already exists and is not empty; use --resume to continue it or choose another folder")
        for entry in entries:  # a run killed in its first epoch: nothing complete to keep
            if entry.name != CANCEL_NAME:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _base_card(manifest: Manifest, config: TrainConfig) -> ModelCard:
    source_kernel, target_kernel = manifest.kernels
    return ModelCard(
        method=config.method, source_kernel=source_kernel, target_kernel=target_kernel, hu_range=tuple(config.hu_range),
        schedule=config.schedule if methods.get(config.method).network else None, config=config.as_card(),
        versions=_versions(), data=DataRecord(manifest=str(manifest.path), pairs=len(manifest.pairs)),
    )


def _fit_closed_form(manifest: Manifest, out: Path, config: TrainConfig) -> ModelCard:
    _prepare_output(out, False, config)
    train_set, val, val_label = _split(manifest, config.val_slices)
    sampler = SliceSampler(train_set, crop=None)
    triples = [(s.hu, t.hu, s.spacing[:2]) for s, t in sampler.volumes]
    model = methods.get(config.method).fit(triples, max(0.5 / min(sp) for _, _, sp in triples))
    card = _base_card(manifest, config)
    spacing = sampler.volumes[0][0].spacing[:2]
    model_psnr, input_psnr = validation_psnr(LoadedModel(card=card, baseline=model), val, spacing, "cpu")
    card.architecture = {"baseline": config.method}
    card.data = DataRecord(manifest=card.data.manifest, pairs=len(train_set.pairs), slices=len(sampler), validation=val_label)
    card.validation = ValidationRecord(psnr_db=model_psnr, input_psnr_db=input_psnr, slices=len(val))
    card.training = TrainingRecord(device="cpu", precision="float64", epochs=0, closed_form=True)
    atomic_torch_save(model.state(), out / WEIGHTS_NAME)
    card.write(out)
    return card


def _train_network(manifest, out, config, resume, progress, cancel_file, on_epoch) -> ModelCard:
    """The epoch loop; what each part does is a method of ``_Run``."""
    dist = _Distributed(resolve_device(config.device))
    try:
        run = _Run(manifest, out, config, resume, dist, progress)
        status = "completed"
        with Cancel(cancel_file or out / CANCEL_NAME) as cancel:
            for epoch in range(run.start_epoch, config.epochs):
                window, started = run.schedule.window, time.perf_counter()
                means = run.train_epoch(epoch, cancel)
                if means is None:
                    status = "cancelled"
                    break
                record = run.end_epoch(epoch, window, means, started)
                if record is not None and on_epoch:
                    on_epoch(record)
        run.finish(status, cancel)
        return run.card
    finally:
        dist.close()


class _Run:
    """One network training run: data, networks, optimisers, window schedule, model card and log, set up (or
    resumed from ``checkpoint.pt``) once; then an epoch of steps, the end of an epoch, the end of the run."""

    def __init__(self, manifest, out: Path, config: TrainConfig, resume: bool, dist: "_Distributed", progress: bool | None):
        import torch

        self.out, self.config, self.dist, self.method = out, config, dist, methods.get(config.method)
        device = self.device = dist.device
        if dist.main:
            _prepare_output(out, resume, config, manifest.kernels)
        train_set, self.val, val_label = _split(manifest, config.val_slices)
        self.sampler = SliceSampler(train_set, crop=config.crop, seed=config.seed + 1000 * dist.rank, contrast=config.contrast_jitter)
        _check_pair_sizes(manifest, train_set, self.sampler, self.val, self.method)
        self.spacing = self.sampler.volumes[0][0].spacing[:2]
        torch.manual_seed(config.seed)
        self.card = card = _base_card(manifest, config)
        self.generator, self.discriminator = build_networks(config.method, {
            "vgg_weights": config.vgg_weights, "finetune_vgg": config.finetune_vgg, "head_gain": config.head_gain})
        generator, discriminator = self.generator, self.discriminator
        card.architecture = {"finetune_vgg": getattr(generator, "finetune_vgg", None), "head_gain": config.head_gain,
                             "vgg_source": getattr(generator, "vgg_source", "none (no pretrained encoder)"),
                             "encoder": getattr(generator, "encoder", None)}
        card.window_scaling, card.inference_window = config.window_scaling, tuple(config.hu_range)
        if "random" in card.architecture["vgg_source"] and dist.main:
            print("radiomicgan: VGG-19 encoder randomly initialised (not ImageNet), as asked; recorded in the model card",
                  file=sys.stderr)
        cuda = device.startswith("cuda")
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        generator.to(device, memory_format=self.memory_format)
        if discriminator is not None:
            discriminator.to(device, memory_format=self.memory_format)
        betas = {"betas": (config.beta1, 0.999)} if self.method.adam_beta1 else {}
        self.opt_g = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=config.lr, **betas)
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(config.beta1, 0.999)) if discriminator else None
        self.schedule = _window_schedule(config)
        self.start_epoch, self.steps_done, self.total_steps = 0, 0, config.epochs * config.steps_per_epoch
        self.best = {"psnr_db": -np.inf, "epoch": None}
        if resume:
            self._resume(torch)
        self.g_train, self.d_train = generator, discriminator
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [int(device.split(":")[1])] if cuda else None
            self.g_train = DDP(generator, device_ids=ids)
            self.d_train = DDP(discriminator, device_ids=ids) if discriminator is not None else None
        self.autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        card.training = TrainingRecord(device=device, precision="bf16 autocast + channels_last" if cuda else "float32",
                                       world_size=dist.world_size, epochs=config.epochs)
        card.data = DataRecord(manifest=card.data.manifest, pairs=len(train_set.pairs), slices=len(self.sampler), validation=val_label)
        self.bar = None
        if (progress if progress is not None else sys.stderr.isatty()) and dist.main:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=self.start_epoch * config.steps_per_epoch,
                            desc=f"train {config.method}", unit="step")
        self.log = open(out / LOG_NAME, "ab", buffering=0) if dist.main else None

    def _resume(self, torch) -> None:
        """Continue from ``checkpoint.pt``; a damaged or mismatched checkpoint is one ``TrainingError`` (resume.py)."""
        from .resume import load_checkpoint, restore

        path = self.out / CHECKPOINT_NAME
        state = load_checkpoint(self.out, self.discriminator is not None)
        restore(path, "generator", self.generator, state["generator"])
        restore(path, "generator optimizer", self.opt_g, state["opt_g"])
        if self.discriminator is not None:
            restore(path, "discriminator", self.discriminator, state["discriminator"])
            restore(path, "discriminator optimizer", self.opt_d, state["opt_d"])
        try:
            s = state["schedule"]
            self.schedule = WindowSchedule(**{**s, "hu_range": tuple(s["hu_range"]), "window": tuple(s["window"])})
            self.start_epoch, self.steps_done = int(state["epoch"]), int(state["steps_done"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"{path}: cannot resume: its window schedule or epoch is damaged ({exc!r:.120})") from None
        self.best = state.get("best", self.best)
        self.sampler.rng = np.random.default_rng([self.config.seed + 1000 * self.dist.rank, self.start_epoch])
        torch.manual_seed(self.config.seed + self.start_epoch)

    def _write_log(self, record: dict) -> None:
        """One whole line or none: a write the disk refuses is cut back and named (``OutputWriteError``)."""
        data, start = (json.dumps(record) + "\n").encode(), self.log.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[self.log.write(view):]
        except OSError as exc:
            os.ftruncate(self.log.fileno(), start)
            raise write_fault(exc, [], [self.out / LOG_NAME], "training log") or exc from None

    def train_epoch(self, epoch: int, cancel) -> dict | None:
        """``steps_per_epoch`` steps; their mean losses and generator accuracy, or None when cancelled."""
        import torch

        config, dist = self.config, self.dist
        self.generator.train()
        if self.discriminator is not None:
            self.discriminator.train()
        sums = {"loss_g": 0.0, "loss_d": 0.0, "l1": 0.0, "l1_input": 0.0, "accuracy": 0.0}
        for _ in range(config.steps_per_epoch):
            if dist.broadcast(cancel()) if dist.active else cancel():
                return None
            source, target = self.sampler.sample(config.batch)
            window = self.schedule.window  # fixed growing paced by steps widens it within an epoch
            x, y = (torch.from_numpy(apply_window(hu, window, config.hu_range, config.window_scaling))[:, None]
                    .to(self.device, memory_format=self.memory_format) for hu in (source, target))
            weight = window_weight(target, window, config.hu_range, config.window_scaling)  # focus scaling only
            if weight is not None:
                weight = torch.from_numpy(weight)[:, None].to(self.device, memory_format=self.memory_format)
            _set_learning_rate(config, (self.opt_g, self.opt_d), self.steps_done, self.total_steps)
            record = train_step(config, self.g_train, self.d_train, self.opt_g, self.opt_d, x, y, self.autocast,
                                adversarial=self.steps_done >= config.adversarial_warmup, weight=weight)
            for k in sums:
                sums[k] += record.get(k, 0.0)
            self.steps_done += 1
            self.schedule.end_step()
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix(window=f"[{window[0]:.0f},{window[1]:.0f}]", l1=f"{record['l1']:.4f}")
            if self.log and self.steps_done % config.log_every == 0:
                self._write_log({"event": "step", "epoch": epoch, "step": self.steps_done, "window": list(window), **record})
        return {k: dist.mean(v / config.steps_per_epoch) for k, v in sums.items()}

    def end_epoch(self, epoch: int, window, means: dict, started: float) -> dict | None:
        """Dynamic selection picks the next window; rank 0 validates, keeps the best epoch and rewrites the model
        folder. Returns the epoch's record (None on the other ranks)."""
        dist, card, schedule = self.dist, self.card, self.schedule
        selected, cam_info = None, {}
        if schedule.needs_cam:
            if dist.main:
                selected, cam_info = _dynamic_selection(self.generator, self.discriminator, self.sampler, self.config, self.device)
            selected = dist.broadcast(selected)
        schedule.end_epoch(epoch, means["accuracy"], selected)
        record = {"event": "epoch", "epoch": epoch, "window": list(window), "next_window": list(schedule.window),
                  "seconds": time.perf_counter() - started, **means, **cam_info}
        if "windows" in schedule.history[-1]:  # fixed growing widened within the epoch
            record["windows"] = schedule.history[-1]["windows"]
        if not dist.main:
            return None
        loaded = LoadedModel(card=card, generator=self.generator.eval(), discriminator=self.discriminator)
        record["val_psnr_db"], record["val_input_psnr_db"] = validation_psnr(loaded, self.val, self.spacing, self.device)
        improved = record["val_psnr_db"] > self.best["psnr_db"]
        if improved:
            self.best = {"psnr_db": record["val_psnr_db"], "epoch": epoch, "window": list(window)}
            card.validation = ValidationRecord(psnr_db=record["val_psnr_db"], input_psnr_db=record["val_input_psnr_db"],
                                               slices=len(self.val), epoch=epoch)
            card.final_window = tuple(window)
        record["best_epoch"] = self.best["epoch"]
        card.window_history = schedule.history
        card.training.epochs_done, card.training.steps_done = epoch + 1, self.steps_done
        card.training.best_epoch, card.training.last_val_psnr_db = self.best["epoch"], record["val_psnr_db"]
        _save(self.out, card, self.generator, self.discriminator, self.opt_g, self.opt_d, schedule, epoch + 1, self.steps_done,
              self.best, improved)
        if _cam_samples(self.out, self.generator, self.discriminator, self.val, self.config, self.device):  # of this epoch's model
            record["cam_samples"] = CAM_SAMPLES
        self._write_log(record)
        return record

    def finish(self, status: str, cancel: "Cancel") -> None:
        """The card says how the run ended; the plots show the model users get (the best epoch)."""
        out, card, dist = self.out, self.card, self.dist
        if self.bar is not None:
            self.bar.close()
        checksums = dist.gather(float(sum(p.detach().double().sum().item() for p in self.generator.parameters())))  # equal when in sync
        if not dist.main:
            return
        if dist.active:
            self._write_log({"event": "ddp_sync", "checksums": checksums, "in_sync": len(set(checksums)) == 1})
        self._write_log({"event": "end", "status": status, "steps": self.steps_done})
        self.log.close()
        card.training.status = status
        if (out / CARD_NAME).exists():
            card.write(out)
            if self.best["epoch"] is not None and self.best["epoch"] + 1 != card.training.epochs_done:
                _restore_best(out, self.generator, self.discriminator)
            _plots(out, card, self.generator, self.discriminator, self.val, self.config, self.device)
        elif status == "cancelled":
            _remove_empty_run(out)
        if status == "cancelled" and cancel.flag_file is not None and cancel.flag_file.is_file():
            cancel.flag_file.unlink()  # the flag is consumed, so that --resume does not stop at once


def _window_schedule(config: TrainConfig) -> WindowSchedule:
    """Fixed growing from [LO, growing_start], paced by ``growing_share`` of the steps; consolidation at the end."""
    consolidate = max(1, round(config.consolidate * config.epochs)) if config.consolidate > 0 and config.schedule != "none" else 0
    steps_per_window = growing_steps_per_window(config.growing_share, config.epochs, config.steps_per_epoch, config.th_eta,
                                                config.hu_range, config.growing_start, config.window_step)
    return WindowSchedule(config.schedule, config.hu_range, config.growing_start, config.window_step, config.th_acc, config.th_eta,
                          epochs=config.epochs, consolidate=consolidate, steps_per_window=steps_per_window)


def _set_learning_rate(config, optimizers, step: int, total: int) -> None:
    """pix2pix's schedule when ``lr_decay``: the base rate for the first half of the steps, then linearly to
    zero; derived from the step count, so a resumed run continues it exactly."""
    factor = 1.0
    if config.lr_decay and total > 1:
        half = total // 2
        factor = 1.0 if step < half else max(0.0, (total - step) / max(1, total - half))
    for opt in optimizers:
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = config.lr * factor


def train_step(config, g, d, opt_g, opt_d, x, y, autocast, adversarial: bool = True, weight=None) -> dict:
    """One optimisation step, by the method's loss (``radiomicgan.methods``). ``weight`` (``focus`` windows): the
    L1 is the mean over the weighted pixels."""
    step = {"gan": _gan_step, "l2": _l2_step}[methods.get(config.method).loss]
    return step(config, g, d, opt_g, opt_d, x, y, autocast, adversarial, weight)


def _l2_step(config, g, d, opt_g, opt_d, x, y, autocast, adversarial, weight) -> dict:
    """Choe et al.: L2 on the residual."""
    import torch.nn.functional as F

    l1_input = (x.float() - y.float()).abs().mean().item()  # what doing nothing scores: the loss to lower
    with autocast:
        fake = g(x)
        loss = F.mse_loss(fake.float(), y.float())
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    return {"loss_g": loss.item(), "l1": (fake.detach().float() - y).abs().mean().item(), "l1_input": l1_input}


def _gan_step(config, g, d, opt_g, opt_d, x, y, autocast, adversarial, weight) -> dict:
    """pix2pix losses: D = 0.5 (BCE(real) + BCE(fake)); G = BCE(fake as real) + lambda L1 (L1 alone while
    ``adversarial`` is off)."""
    import torch
    import torch.nn.functional as F

    l1_input = (x.float() - y.float()).abs().mean().item()  # what doing nothing scores: the loss to lower
    with autocast:
        fake = g(x)
        logits_fake = d(x, fake.detach())
        logits_real = d(x, y)
        loss_d = 0.5 * (F.binary_cross_entropy_with_logits(logits_real.float(), torch.ones_like(logits_real, dtype=torch.float32))
                        + F.binary_cross_entropy_with_logits(logits_fake.float(), torch.zeros_like(logits_fake, dtype=torch.float32)))
    accuracy = float((logits_fake.detach() > 0).float().mean())  # patches that call the synthesized image standard
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    with autocast:
        if weight is None:
            l1 = F.l1_loss(fake.float(), y.float())
        else:
            l1 = ((fake.float() - y.float()).abs() * weight).sum() / weight.sum().clamp(min=1.0)
        loss_g = config.lambda_l1 * l1
        if adversarial:  # off during the warm-up: the discriminator trains meanwhile, the generator sees L1 only
            logits = d(x, fake)
            loss_g = loss_g + F.binary_cross_entropy_with_logits(logits.float(), torch.ones_like(logits, dtype=torch.float32))
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    return {"loss_g": loss_g.item(), "loss_d": loss_d.item(), "l1": l1.item(), "l1_input": l1_input, "accuracy": accuracy}


def synthesize_with_cam(generator, discriminator, source_hu: np.ndarray, hu_range, device) -> tuple[np.ndarray, np.ndarray]:
    """Synthesized HU slices and the frozen discriminator's Grad-CAM maps of them, for same-size source slices."""
    import torch

    from .gradcam import gradcam_nonstandard
    from .models import pad_to_multiple
    from .window import from_unit, to_unit

    generator.eval()
    x = torch.from_numpy(to_unit(np.clip(source_hu, *hu_range), hu_range).astype(np.float32))[:, None].to(device)
    with torch.no_grad():
        padded, (h, w) = pad_to_multiple(x, generator.divisor)
        fake = generator(padded)[..., :h, :w]
    cams = gradcam_nonstandard(discriminator, x, fake)[:, 0].cpu().numpy()
    return from_unit(fake[:, 0].float().cpu().numpy(), hu_range), cams


def _dynamic_selection(generator, discriminator, sampler, config, device):
    """Grad-CAM of the frozen discriminator on synthesized images of a random subset P of training slices."""
    source, _ = sampler.sample(config.cam_subset)
    hu, cams = synthesize_with_cam(generator, discriminator, source, config.hu_range, device)
    selected, details = select_window(list(cams), list(hu), config.th_fail, config.hu_range)
    return selected, {"cam_" + k: v for k, v in details.items()}


def _save(out, card, generator, discriminator, opt_g, opt_d, schedule, epoch, steps_done, best, improved) -> None:
    """``checkpoint.pt``: the latest epoch, to resume; ``weights.pt``: the epoch with the best validation PSNR,
    what harmonization uses."""
    checkpoint = {"generator": generator.state_dict(), "opt_g": opt_g.state_dict(), "epoch": epoch, "steps_done": steps_done,
                  "schedule": schedule.state(), "best": best}
    if discriminator is not None:
        checkpoint["discriminator"] = discriminator.state_dict()
        checkpoint["opt_d"] = opt_d.state_dict()
    if improved:
        weights = {"generator": generator.state_dict()}
        if discriminator is not None:
            weights["discriminator"] = discriminator.state_dict()
        atomic_torch_save(weights, out / WEIGHTS_NAME, "weights of the best epoch")
    atomic_torch_save(checkpoint, out / CHECKPOINT_NAME, "training checkpoint")
    card.write(out)


def _restore_best(out: Path, generator, discriminator) -> None:
    state = safe_load(out / WEIGHTS_NAME)
    generator.load_state_dict(state["generator"])
    if discriminator is not None:
        discriminator.load_state_dict(state["discriminator"])


def _remove_empty_run(out: Path) -> None:
    """A run cancelled before its first epoch completed removes its own log; the folder itself goes only if this
    run made it (``train``), so a folder the user made stays."""
    if (out / LOG_NAME).exists():
        (out / LOG_NAME).unlink()


def _plots(out: Path, card: ModelCard, generator, discriminator, val, config, device) -> None:
    """The window history (paper Fig. 5a) and the sample Grad-CAM maps (Fig. 5b; their data is written after every
    epoch by ``_cam_samples``), saved as plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = card.window_history or []
    if history:
        fig, ax = plt.subplots(figsize=(8.5, 3.6))
        epochs = [h["epoch"] for h in history]
        colours = {"fixed": "tab:blue", "dynamic": "tab:orange", "consolidation": "tab:green", "full": "tab:gray"}
        for h in history:
            windows = h.get("windows", [[h["lo"], h["hi"]]])  # several when fixed growing widened within the epoch
            width = 0.8 / len(windows)
            for i, (lo, hi) in enumerate(windows):
                ax.bar(h["epoch"] - 0.4 + width * (i + 0.5), hi - lo, bottom=lo, color=colours.get(h["phase"], "tab:gray"), width=width)
        from matplotlib.patches import Patch

        names = {"fixed": "fixed growing", "dynamic": "dynamic selection", "consolidation": "consolidation (inference window)",
                 "full": "whole range"}
        handles = [Patch(color=colours[p], label=names[p]) for p in names if any(h["phase"] == p for h in history)]
        ax.set_xlabel("epoch")
        ax.set_ylabel("training window (HU)")
        ax.set_xticks(epochs)
        ax.set_title(f"Dynamic window-based training: {card.schedule} schedule")
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
        fig.tight_layout()
        with staged(out / WINDOWS_PLOT, what="window history figure") as tmp:
            fig.savefig(tmp, dpi=100)
        plt.close(fig)
    _cam_plot(out, config.th_fail, config.hu_range)


def _cam_samples(out: Path, generator, discriminator, val, config, device) -> bool:
    """Sample Grad-CAM maps of the current model (paper Fig. 5b) as data, replaced atomically so a reader (the
    Slicer panel, which shows them after each epoch) never sees half a file. False when there is no discriminator."""
    if discriminator is None or not val:
        return False
    shapes = {s.shape for s, _ in val}
    samples = np.stack([s for s, _ in val][:3] if len(shapes) == 1 else [val[0][0]])
    synthesized, cams = synthesize_with_cam(generator, discriminator, samples, config.hu_range, device)
    with staged(out / CAM_SAMPLES, what="Grad-CAM samples") as tmp:
        np.savez_compressed(tmp, source=samples, synthesized=synthesized, cam=cams)
    return True


def _cam_plot(out: Path, th_fail: float, hu_range) -> None:
    """The plot of the last Grad-CAM samples written (those of the last complete epoch)."""
    if not (out / CAM_SAMPLES).is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with np.load(out / CAM_SAMPLES) as data:
        samples, synthesized, cams = data["source"], data["synthesized"], data["cam"]
    windows = [select_window([c], [s], th_fail, hu_range)[0] for c, s in zip(cams, synthesized)]
    fig, axes = plt.subplots(len(samples), 3, figsize=(10, 3.3 * len(samples)), squeeze=False)
    for row, (src, syn, cam, win) in enumerate(zip(samples, synthesized, cams, windows)):
        axes[row, 0].imshow(src, cmap="gray", vmin=-800, vmax=800)
        axes[row, 0].set_title("input")
        axes[row, 1].imshow(syn, cmap="gray", vmin=-800, vmax=800)
        axes[row, 1].set_title("synthesized")
        axes[row, 2].imshow(syn, cmap="gray", vmin=-800, vmax=800)
        axes[row, 2].imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[row, 2].set_title("Grad-CAM, non-standard\n" + (f"hot spots span [{win[0]:.0f}, {win[1]:.0f}] HU" if win else "no hot spot"), fontsize=9)
        for ax in axes[row]:
            ax.axis("off")
    fig.tight_layout()
    with staged(out / CAM_PLOT, what="Grad-CAM figure") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
