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
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .dataset import Manifest, SliceSampler, load_manifest
from .errors import RadiomicGANError
from .metrics import psnr
from .modelio import (
    CARD_NAME,
    CHECKPOINT_NAME,
    METHODS,
    MODEL_FORMAT,
    NETWORK_METHODS,
    WEIGHTS_NAME,
    LoadedModel,
    atomic_torch_save,
    build_networks,
    resolve_device,
    safe_load,
    write_card,
)
from .window import (STANDARD_RANGE, WINDOW_SCALINGS, WindowSchedule, apply_window, growing_steps_per_window, select_window,
                     window_weight)

MIN_GAN_CROP = 32  # below it the U-Net bottleneck (1/8) or the PatchGAN's last layers shrink to 1x1 (instance norm fails)
from .jobs import CAM_PLOT, CAM_SAMPLES, CANCEL_NAME, LOG_NAME, WINDOWS_PLOT  # noqa: E402,F401  (shared with the programs that read them)


class TrainingError(RadiomicGANError):
    pass


# Adam learning rates. RadiomicGAN and pix2pix: 2e-4, as pix2pix and the authors' script use (the paper says
# 1e-4); measured on the real slice at the demo's budget (300 steps): 48.5 dB at 2e-4 against 45.0 dB at 1e-4
# (bench/real_slice_sweep.sh, README). Choe et al.: their published 1e-4.
DEFAULT_LR = {"radiomicgan": 2e-4, "pix2pix": 2e-4, "choe": 1e-4}


@dataclass
class TrainConfig:
    method: str = "radiomicgan"
    schedule: str = "dwt"
    epochs: int = 30  # the paper's maximum
    steps_per_epoch: int = 100
    batch: int = 4
    crop: int = 128
    lr: float | None = None  # None: DEFAULT_LR for the method
    beta1: float = 0.5  # paper
    lr_decay: bool = True  # pix2pix: constant for the first half of the steps, then linearly to zero
    lambda_l1: float = 100.0
    adversarial_warmup: int = 0  # first steps with the L1 loss only (the discriminator trains meanwhile)
    contrast_jitter: float = 0.0  # training crops' HU scaled about air by 1 +- this (SliceSampler); 0: off
    window_scaling: str = "fixed"  # "window" (the paper's min-max per window), "fixed" (over hu_range) or "focus" (L1 weighs the window)
    consolidate: float = 0.25  # fraction of the epochs (at least one) that end DWT at the inference window
    th_acc: float = 0.5
    th_eta: int = 2
    growing_share: float = 0.25  # fixed growing takes at most this share of the steps (0: paced by th_eta epochs only)
    th_fail: float = 0.5
    cam_subset: int = 8  # |P|: slices whose Grad-CAM picks the next window
    window_step: float = 256.0
    hu_range: tuple[float, float] = STANDARD_RANGE
    vgg_weights: str = "imagenet"
    finetune_vgg: bool | None = None  # None: frozen for pretrained weights (paper), trained when random
    head_gain: float = 1.0
    device: str = "auto"
    seed: int = 0
    val_slices: int = 8
    log_every: int = 10
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.method, 1e-4)
        if self.method not in METHODS:
            raise TrainingError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.method in ("choe", "pix2pix") and self.schedule != "none":
            raise TrainingError(f"method '{self.method}' trains on the whole range: use --schedule none")
        for name in ("epochs", "steps_per_epoch", "batch", "crop", "th_eta", "cam_subset"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name.replace('_', '-')} must be at least 1")
        if self.window_scaling not in WINDOW_SCALINGS:
            raise TrainingError(f"unknown window scaling '{self.window_scaling}'; choose one of {', '.join(WINDOW_SCALINGS)}")
        if not 0.0 <= self.growing_share <= 1.0:
            raise TrainingError(f"growing share must be a fraction in [0, 1], got {self.growing_share}")
        if not 0.0 <= self.contrast_jitter < 1.0:
            raise TrainingError(f"contrast jitter must be a fraction in [0, 1), got {self.contrast_jitter}")
        if not 0.0 <= self.consolidate < 1.0:
            raise TrainingError(f"consolidate must be a fraction in [0, 1), got {self.consolidate}")
        if self.method in ("radiomicgan", "pix2pix") and self.crop % 8:
            raise TrainingError(f"crop {self.crop} must be a multiple of 8 (three poolings in the U-Net)")
        if self.method in ("radiomicgan", "pix2pix") and self.crop < MIN_GAN_CROP:
            raise TrainingError(f"crop {self.crop}: {self.method} needs at least {MIN_GAN_CROP}x{MIN_GAN_CROP} pixels (smaller, "
                                f"its bottleneck and discriminator shrink to 1x1); use --crop {MIN_GAN_CROP} or more")


# ---------------------------------------------------------------------------------------------- helpers


class Cancel:
    """Stop at the next step on Ctrl-C or when a flag file appears (for programs that launch training)."""

    def __init__(self, flag_file: Path | None):
        self.flag_file = flag_file
        self.requested = False
        self._previous = None

    def __enter__(self):
        if hasattr(signal, "SIGINT") and _main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _on_signal(self, signum, frame):
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("\nradiomicgan: stopping after this step (Ctrl-C again to abort at once)", file=sys.stderr)

    def __call__(self) -> bool:
        if self.flag_file is not None and self.flag_file.exists():
            self.requested = True
        return self.requested


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


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


def _check_pair_sizes(manifest: Manifest, train_set: Manifest, sampler: SliceSampler, val, method: str) -> None:
    """Every pair, the held-out one included (validated and Grad-CAM-sampled on whole slices), against the network's
    minimum slice size, before any step: a smaller pair is named instead of failing deep inside instance norm."""
    if method not in ("radiomicgan", "pix2pix"):
        return
    sizes = [(pair, source.shape[1:]) for pair, (source, _) in zip(train_set.pairs, sampler.volumes)]
    held = [p for p in manifest.pairs if p not in train_set.pairs]
    sizes += [(held[0], val[0][0].shape)] if held and val else []
    for pair, (rows, cols) in sizes:
        if min(rows, cols) < MIN_GAN_CROP:
            role = "held-out pair" if pair in held else "pair"
            raise TrainingError(f"{pair.source}: {role} '{pair.id}' has slices of {rows}x{cols} pixels; {method} needs at least "
                                f"{MIN_GAN_CROP}x{MIN_GAN_CROP} (smaller, its discriminator shrinks to 1x1); remove the pair or "
                                "give it at a larger size")


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
) -> dict:
    """Train and write a model folder; returns the card. ``on_epoch`` receives each epoch's record."""
    config.check()
    manifest = load_manifest(pairs)
    out = Path(out)
    created = not out.exists()
    try:
        if config.method in ("filter", "histmatch"):
            return _fit_closed_form(manifest, out, config, resume)
        card = _train_network(manifest, out, config, resume, progress, cancel_file, on_epoch)
        if created and card.get("training", {}).get("status") == "cancelled" and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # cancelled before a first epoch, in a folder this run made: leave nothing
        return card
    except BaseException:
        if created and out.is_dir() and not (out / CARD_NAME).exists():  # failed before any model existed
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare_output(out: Path, resume: bool, config: TrainConfig, kernels=(None, None)) -> None:
    if resume:
        from .resume import check_resume

        check_resume(out, config, kernels)  # a damaged folder, other settings or kernel direction: one line
    elif out.exists() and any(p.name != CANCEL_NAME for p in out.iterdir()):
        raise TrainingError(f"{out}: already exists and is not empty; use --resume to continue it or choose another folder")
    out.mkdir(parents=True, exist_ok=True)


def _base_card(manifest: Manifest, config: TrainConfig) -> dict:
    source_kernel, target_kernel = manifest.kernels
    return {
        "format": MODEL_FORMAT,
        "method": config.method,
        "schedule": config.schedule if config.method in NETWORK_METHODS else None,
        "source_kernel": source_kernel,
        "target_kernel": target_kernel,
        "hu_range": list(config.hu_range),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "versions": _versions(),
        "data": {"manifest": str(manifest.path), "pairs": len(manifest.pairs)},
    }


def _fit_closed_form(manifest: Manifest, out: Path, config: TrainConfig, resume: bool) -> dict:
    from .baselines import FilterHarmonizer, HistMatchHarmonizer

    _prepare_output(out, False, config)
    train_set, val, val_label = _split(manifest, config.val_slices)
    sampler = SliceSampler(train_set, crop=None)
    triples = [(s.hu, t.hu, s.spacing[:2]) for s, t in sampler.volumes]
    if config.method == "filter":
        nyquist = max(0.5 / min(sp) for _, _, sp in triples)
        model = FilterHarmonizer.fit(triples, nyquist)
    else:
        model = HistMatchHarmonizer.fit(triples)
    card = _base_card(manifest, config)
    spacing = sampler.volumes[0][0].spacing[:2]
    loaded = LoadedModel(card=card, baseline=model)
    model_psnr, input_psnr = validation_psnr(loaded, val, spacing, "cpu")
    card.update(
        architecture={"baseline": config.method},
        data={**card["data"], "pairs": len(train_set.pairs), "slices": len(sampler), "validation": val_label},
        validation={"psnr_db": model_psnr, "input_psnr_db": input_psnr, "slices": len(val)},
        training={"epochs": 0, "epochs_done": 0, "steps_done": 0, "device": "cpu", "precision": "float64", "closed_form": True},
    )
    atomic_torch_save(model.state(), out / WEIGHTS_NAME)
    write_card(out, card)
    return card


def _train_network(manifest, out, config, resume, progress, cancel_file, on_epoch) -> dict:
    import torch
    import torch.nn.functional as F

    device = resolve_device(config.device)
    dist = _Distributed(device)
    device = dist.device
    try:
        if dist.main:
            _prepare_output(out, resume, config, manifest.kernels)
        train_set, val, val_label = _split(manifest, config.val_slices)
        sampler = SliceSampler(train_set, crop=config.crop, seed=config.seed + 1000 * dist.rank, contrast=config.contrast_jitter)
        _check_pair_sizes(manifest, train_set, sampler, val, config.method)
        spacing = sampler.volumes[0][0].spacing[:2]
        torch.manual_seed(config.seed)

        card = _base_card(manifest, config)
        card["architecture"] = {"vgg_weights": config.vgg_weights, "finetune_vgg": config.finetune_vgg, "head_gain": config.head_gain}
        generator, discriminator = build_networks(card)
        card["architecture"]["vgg_source"] = getattr(generator, "vgg_source", "none (no pretrained encoder)")
        card["architecture"]["finetune_vgg"] = getattr(generator, "finetune_vgg", None)
        card["architecture"]["encoder"] = getattr(generator, "encoder", None)
        card["architecture"].pop("vgg_weights")
        card["window_scaling"] = config.window_scaling
        card["inference_window"] = list(config.hu_range)
        if "random" in card["architecture"]["vgg_source"] and config.method == "radiomicgan" and dist.main:
            print("radiomicgan: VGG-19 encoder randomly initialised (not ImageNet), as asked; recorded in the model card",
                  file=sys.stderr)
        cuda = device.startswith("cuda")
        memory_format = torch.channels_last if cuda else torch.contiguous_format
        generator.to(device, memory_format=memory_format)
        if discriminator is not None:
            discriminator.to(device, memory_format=memory_format)
        g_params = [p for p in generator.parameters() if p.requires_grad]
        if config.method == "choe":
            opt_g = torch.optim.Adam(g_params, lr=config.lr)
        else:
            opt_g = torch.optim.Adam(g_params, lr=config.lr, betas=(config.beta1, 0.999))
        opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=(config.beta1, 0.999)) if discriminator else None
        consolidate = max(1, round(config.consolidate * config.epochs)) if config.consolidate > 0 and config.schedule != "none" else 0
        total_steps = config.epochs * config.steps_per_epoch
        steps_per_window = growing_steps_per_window(config.growing_share, config.epochs, config.steps_per_epoch, config.th_eta,
                                                    config.hu_range, -769.0, config.window_step)
        schedule = WindowSchedule(config.schedule, config.hu_range, -769.0, config.window_step, config.th_acc, config.th_eta,
                                  epochs=config.epochs, consolidate=consolidate, steps_per_window=steps_per_window)
        start_epoch, steps_done = 0, 0
        best = {"psnr_db": -np.inf, "epoch": None}

        if resume:
            from .resume import load_checkpoint, restore

            path = out / CHECKPOINT_NAME
            state = load_checkpoint(out, discriminator is not None)
            restore(path, "generator", generator, state["generator"])
            restore(path, "generator optimizer", opt_g, state["opt_g"])
            if discriminator is not None:
                restore(path, "discriminator", discriminator, state["discriminator"])
                restore(path, "discriminator optimizer", opt_d, state["opt_d"])
            try:
                schedule = WindowSchedule(**{**state["schedule"], "hu_range": tuple(state["schedule"]["hu_range"]),
                                             "window": tuple(state["schedule"]["window"])})
                start_epoch, steps_done = int(state["epoch"]), int(state["steps_done"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TrainingError(f"{path}: cannot resume: its window schedule or epoch is damaged ({exc!r:.120})") from None
            best = state.get("best", best)
            sampler.rng = np.random.default_rng([config.seed + 1000 * dist.rank, start_epoch])
            torch.manual_seed(config.seed + start_epoch)

        g_train, d_train = generator, discriminator
        if dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [int(device.split(":")[1])] if cuda else None
            g_train = DDP(generator, device_ids=ids)
            d_train = DDP(discriminator, device_ids=ids) if discriminator is not None else None

        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
        card["training"] = {"device": device, "precision": "bf16 autocast + channels_last" if cuda else "float32",
                            "world_size": dist.world_size, "epochs": config.epochs}
        card["data"].update(pairs=len(train_set.pairs), slices=len(sampler), validation=val_label)

        bar = None
        show = progress if progress is not None else sys.stderr.isatty()
        if show and dist.main:
            from tqdm import tqdm

            bar = tqdm(total=config.epochs * config.steps_per_epoch, initial=start_epoch * config.steps_per_epoch,
                       desc=f"train {config.method}", unit="step")
        log = open(out / LOG_NAME, "a") if dist.main else None
        cancel = Cancel(cancel_file or out / CANCEL_NAME)
        status = "completed"
        with cancel:
            for epoch in range(start_epoch, config.epochs):
                window = schedule.window
                generator.train()
                if discriminator is not None:
                    discriminator.train()
                sums = {"loss_g": 0.0, "loss_d": 0.0, "l1": 0.0, "l1_input": 0.0, "accuracy": 0.0}
                started = time.perf_counter()
                for step in range(config.steps_per_epoch):
                    if dist.broadcast(cancel()) if dist.active else cancel():
                        status = "cancelled"
                        break
                    source, target = sampler.sample(config.batch)
                    step_window = schedule.window  # fixed growing paced by steps widens it within an epoch
                    x = torch.from_numpy(apply_window(source, step_window, config.hu_range, config.window_scaling))[:, None].to(device, memory_format=memory_format)
                    y = torch.from_numpy(apply_window(target, step_window, config.hu_range, config.window_scaling))[:, None].to(device, memory_format=memory_format)
                    weight = window_weight(target, step_window, config.hu_range, config.window_scaling)
                    if weight is not None:
                        weight = torch.from_numpy(weight)[:, None].to(device, memory_format=memory_format)
                    _set_learning_rate(config, (opt_g, opt_d), steps_done, total_steps)
                    record = train_step(config, g_train, d_train, opt_g, opt_d, x, y, autocast, F,
                                        adversarial=steps_done >= config.adversarial_warmup, weight=weight)
                    for k in sums:
                        sums[k] += record.get(k, 0.0)
                    steps_done += 1
                    schedule.end_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(window=f"[{step_window[0]:.0f},{step_window[1]:.0f}]", l1=f"{record['l1']:.4f}")
                    if log and steps_done % config.log_every == 0:
                        log.write(json.dumps({"event": "step", "epoch": epoch, "step": steps_done, "window": list(step_window), **record}) + "\n")
                        log.flush()
                if status == "cancelled":
                    break
                means = {k: dist.mean(v / config.steps_per_epoch) for k, v in sums.items()}
                selected, cam_info = None, {}
                if schedule.needs_cam:
                    if dist.main:
                        selected, cam_info = _dynamic_selection(generator, discriminator, sampler, config, device)
                    selected = dist.broadcast(selected)
                schedule.end_epoch(epoch, means["accuracy"], selected)
                epoch_record = {"event": "epoch", "epoch": epoch, "window": list(window), "next_window": list(schedule.window),
                                "seconds": time.perf_counter() - started, **means, **cam_info}
                if "windows" in schedule.history[-1]:  # fixed growing widened within the epoch
                    epoch_record["windows"] = schedule.history[-1]["windows"]
                if dist.main:
                    loaded = LoadedModel(card=card, generator=generator.eval(), discriminator=discriminator)
                    epoch_record["val_psnr_db"], epoch_record["val_input_psnr_db"] = validation_psnr(loaded, val, spacing, device)
                    improved = epoch_record["val_psnr_db"] > best["psnr_db"]
                    if improved:
                        best = {"psnr_db": epoch_record["val_psnr_db"], "epoch": epoch, "window": list(window)}
                        card["validation"] = {"psnr_db": epoch_record["val_psnr_db"], "input_psnr_db": epoch_record["val_input_psnr_db"],
                                              "slices": len(val), "epoch": epoch}
                        card["final_window"] = list(window)
                    epoch_record["best_epoch"] = best["epoch"]
                    card["window_history"] = schedule.history
                    card["training"].update(epochs_done=epoch + 1, steps_done=steps_done, best_epoch=best["epoch"],
                                            last_val_psnr_db=epoch_record["val_psnr_db"])
                    _save(out, card, generator, discriminator, opt_g, opt_d, schedule, epoch + 1, steps_done, best, improved)
                    if _cam_samples(out, generator, discriminator, val, config, device):  # of this epoch's model
                        epoch_record["cam_samples"] = CAM_SAMPLES
                    log.write(json.dumps(epoch_record) + "\n")
                    log.flush()
                    if on_epoch:
                        on_epoch(epoch_record)
        if bar is not None:
            bar.close()
        checksums = dist.gather(float(sum(p.detach().double().sum().item() for p in generator.parameters())))  # equal when in sync
        if dist.main:
            if dist.active:
                log.write(json.dumps({"event": "ddp_sync", "checksums": checksums, "in_sync": len(set(checksums)) == 1}) + "\n")
            log.write(json.dumps({"event": "end", "status": status, "steps": steps_done}) + "\n")
            log.close()
            card["training"]["status"] = status
            if (out / CARD_NAME).exists():
                write_card(out, card)
                if best["epoch"] is not None and best["epoch"] + 1 != card["training"].get("epochs_done"):
                    _restore_best(out, generator, discriminator)  # the plots show the model users get
                _plots(out, card, generator, discriminator, val, config, device)
            elif status == "cancelled":
                _remove_empty_run(out)
            if status == "cancelled" and cancel.flag_file is not None and cancel.flag_file.is_file():
                cancel.flag_file.unlink()  # the flag is consumed, so that --resume does not stop at once
        return card
    finally:
        dist.close()


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


def train_step(config, g, d, opt_g, opt_d, x, y, autocast, F, adversarial: bool = True, weight=None) -> dict:
    """One optimisation step. pix2pix losses: D = 0.5 (BCE(real) + BCE(fake)); G = BCE(fake as real) +
    lambda L1 (L1 alone while ``adversarial`` is off). Choe: L2 only. ``weight`` (``focus`` windows): the L1 is
    the mean over the weighted pixels."""
    import torch

    l1_input = (x.float() - y.float()).abs().mean().item()  # what doing nothing scores: the loss to lower
    if d is None:  # Choe et al.: L2 on the residual
        with autocast:
            fake = g(x)
            loss = F.mse_loss(fake.float(), y.float())
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        return {"loss_g": loss.item(), "l1": (fake.detach().float() - y).abs().mean().item(), "l1_input": l1_input}
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
        atomic_torch_save(weights, out / WEIGHTS_NAME)
    atomic_torch_save(checkpoint, out / CHECKPOINT_NAME)
    write_card(out, card)


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


def _plots(out: Path, card: dict, generator, discriminator, val, config, device) -> None:
    """The window history (paper Fig. 5a) and the sample Grad-CAM maps (Fig. 5b; their data is written after every
    epoch by ``_cam_samples``), saved as plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = card.get("window_history", [])
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
        ax.set_title(f"Dynamic window-based training: {card.get('schedule')} schedule")
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
        fig.tight_layout()
        fig.savefig(out / WINDOWS_PLOT, dpi=100)
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
    partial = out / f".{CAM_SAMPLES}.partial.npz"
    np.savez_compressed(partial, source=samples, synthesized=synthesized, cam=cams)
    os.replace(partial, out / CAM_SAMPLES)
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
    fig.savefig(out / CAM_PLOT, dpi=80)
    plt.close(fig)
