"""Training of the two built-in networks: the `digits` denoiser and the metrics classifier.

Both train on the train split of `fewstep_search.data` only, deterministically on CPU (fixed seed, fixed
thread count, one seeded generator for every random draw), and write safetensors weights (architecture config
in the file's metadata) plus a JSON card, atomically. The shipped assets in `fewstep_search/assets/` were made
by these functions with their defaults; `fewstep-search pretrain digits|classifier` calls them.

Denoiser recipe (Karras et al. 2022, "EDM"): preconditioned loss, ln sigma ~ N(P_mean = -1.2, P_std = 1.2),
Adam with a short warm-up and a cosine decay, and an exponential moving average (EMA) of the weights with a
half-life in steps (ramped up at the start, as EDM does); the EMA weights are shipped.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from fewstep_search.atomic import atomic_write_bytes, atomic_write_json
from fewstep_search.data import digits_split
from fewstep_search.metrics import CLASSIFIER_ASSET, CLASSIFIER_CARD_ASSET, ClassifierConfig, DigitsClassifier
from fewstep_search.models.digits import (
    CARD_ASSET,
    CONFIG_METADATA_KEY,
    SIGMA_DATA,
    SIGMA_MAX,
    SIGMA_MIN,
    WEIGHTS_ASSET,
    DigitsNetConfig,
    DigitsUNet,
    EDMDenoiser,
)
from fewstep_search.progress import task_progress

__all__ = ["pretrain_digits", "pretrain_classifier", "P_MEAN", "P_STD"]

P_MEAN = -1.2
"""Mean of ln sigma during training (EDM)."""
P_STD = 1.2
"""Std of ln sigma during training (EDM)."""
_EVAL_SEED = 1234
"""Seed of the fixed noise of the held-out denoising loss in the card (independent of the train seed)."""


# ------------------------------------------------------------------------------------------- shared helpers
def _save_weights(path: Path, module: nn.Module, config: dict[str, object], *, dtype: torch.dtype) -> None:
    """safetensors with the architecture config in the metadata, so the file alone rebuilds the network."""
    from safetensors.torch import save

    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in module.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={CONFIG_METADATA_KEY: json.dumps(config)}))


@contextmanager
def _fixed_threads(threads: int) -> Iterator[None]:
    """Fix the intra-op thread count (reduction order, so bitwise results, depends on it); restore after."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _warmup_cosine(*, steps: int, warmup: int) -> Callable[[int], float]:
    """The LR factor of `LambdaLR`: linear warm-up, then cosine decay to 5% of the base LR."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(steps - warmup, 1)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


# --------------------------------------------------------------------------------------------- the denoiser
def _sample_sigma(n: int, gen: torch.Generator) -> Tensor:
    return (torch.randn(n, generator=gen, dtype=torch.float64) * P_STD + P_MEAN).exp()


@torch.no_grad()
def _heldout_loss(model: EDMDenoiser, x0: Tensor, *, repeats: int = 8) -> float:
    """EDM loss on held-out digits at fixed noise (same draws for every model): a generalization check."""
    gen = torch.Generator().manual_seed(_EVAL_SEED)
    model.eval()
    total = 0.0
    for _ in range(repeats):
        sigma = _sample_sigma(x0.shape[0], gen)
        noise = torch.randn(x0.shape, generator=gen)
        total += float(model.raw_loss(x0, sigma, noise).mean())
    return total / repeats


def _edm_ema(module: nn.Module, *, halflife: int, rampup: float) -> AveragedModel:
    """`AveragedModel` with EDM's EMA: half-life `halflife` steps, capped at `rampup * step` early on, so the
    average does not remember the random initialization (its first update copies the weights)."""

    def avg(averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        life = max(min(halflife, rampup * (int(num_averaged) + 1)), 1e-8)
        return averaged.lerp(current, 1.0 - 0.5 ** (1.0 / life))

    ema = AveragedModel(module, avg_fn=avg, use_buffers=True)
    return ema.eval().requires_grad_(False)


def pretrain_digits(
    *,
    out_dir: str | Path,
    seed: int = 0,
    steps: int = 5000,
    batch_size: int = 256,
    lr: float = 2e-3,
    warmup: int = 200,
    ema_halflife: int = 500,
    ema_rampup: float = 0.1,
    config: DigitsNetConfig | None = None,
    threads: int = 2,
    weights_dtype: torch.dtype = torch.float16,
    progress: bool = True,
) -> Path:
    """Train the digits denoiser; write `digits.safetensors` + `digits.json` in `out_dir`; return the weights.

    `ema_halflife` is in optimizer steps, capped at `ema_rampup * step` early on (EDM's EMA ramp-up) so the
    average does not remember the random initialization. The card records data, split, architecture,
    training options, wall time and the held-out denoising loss of the EMA weights. Deterministic for a fixed
    (seed, threads) on the same torch build.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    out = Path(out_dir)
    config = config or DigitsNetConfig()
    split = digits_split()
    x_train = split.train_x
    with _fixed_threads(threads):
        torch.manual_seed(seed)  # initialization and dropout
        gen = torch.Generator().manual_seed(seed)  # batches, sigmas, noise
        model = EDMDenoiser(DigitsUNet(config))
        ema = _edm_ema(model.net, halflife=ema_halflife, rampup=ema_rampup)
        opt = torch.optim.Adam(model.net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps=steps, warmup=warmup))
        t0, c0 = time.perf_counter(), time.process_time()
        perm, pos, running = torch.randperm(x_train.shape[0], generator=gen), 0, float("nan")
        with task_progress("pretrain digits", total=steps, enabled=progress) as tick:
            for step in range(steps):
                if pos + batch_size > perm.numel():  # epoch boundary: reshuffle, drop the short remainder
                    perm, pos = torch.randperm(x_train.shape[0], generator=gen), 0
                x0 = x_train[perm[pos : pos + batch_size]]
                pos += batch_size
                sigma = _sample_sigma(x0.shape[0], gen)
                noise = torch.randn(x0.shape, generator=gen)
                model.train()
                loss = model.raw_loss(x0, sigma, noise).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ema.update_parameters(model.net)
                value = loss.item()
                running = value if math.isnan(running) else 0.98 * running + 0.02 * value
                if not math.isfinite(running):
                    raise RuntimeError(f"training diverged at step {step} (loss {value})")
                tick()
        train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        shipped = EDMDenoiser(ema.module)
        # Evaluate the weights as they will be loaded (rounded to the storage dtype), not the float32 copy.
        rounded = EDMDenoiser(copy.deepcopy(ema.module))
        with torch.no_grad():
            for p in rounded.parameters():
                p.copy_(p.to(weights_dtype).float())
        held = _heldout_loss(rounded, split.heldout_x)
        held_fp32 = _heldout_loss(shipped, split.heldout_x)
    weights = out / WEIGHTS_ASSET
    _save_weights(weights, ema.module, config.to_dict(), dtype=weights_dtype)
    card = {
        "name": "digits",
        "description": "EDM-preconditioned U-Net denoiser on 8x8 digits (built-in model of fewstep-search)",
        "data": split.describe(),
        "architecture": config.to_dict(),
        "n_parameters": sum(p.numel() for p in ema.module.parameters()),
        "preconditioning": {"kind": "EDM (Karras et al. 2022)", "sigma_data": SIGMA_DATA},
        "sigma_min": SIGMA_MIN,
        "sigma_max": SIGMA_MAX,
        "prediction_type": "x0",
        "training": {
            "function": "fewstep_search.pretrain.pretrain_digits",
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "optimizer": "Adam",
            "lr": lr,
            "lr_schedule": f"linear warm-up {warmup} steps, cosine decay to 5%",
            "ema_halflife_steps": ema_halflife,
            "ema_rampup": ema_rampup,
            "noise": {"P_mean": P_MEAN, "P_std": P_STD},
            "threads": threads,
            "torch": torch.__version__,
            "wall_seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "final_train_loss_smoothed": round(running, 5),
        },
        "weights_dtype": str(weights_dtype).removeprefix("torch."),
        "metrics": {
            "heldout_edm_loss": round(held, 5),
            "heldout_edm_loss_float32": round(held_fp32, 5),
        },
    }
    atomic_write_json(out / CARD_ASSET, card)
    return weights


# ------------------------------------------------------------------------------------------- the classifier
def _shift(x: Tensor, gen: torch.Generator, max_shift: int) -> Tensor:
    """Random integer translations (zero-padded, background = -1): the one augmentation digits tolerate."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = nn.functional.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


def pretrain_classifier(
    *,
    out_dir: str | Path,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 2e-3,
    max_shift: int = 1,
    config: ClassifierConfig | None = None,
    threads: int = 2,
    progress: bool = True,
) -> Path:
    """Train the metrics classifier on the train split; write the weights + card; return their path.

    The card records held-out accuracy and the real-data FD floor (train split vs held-out) in its feature
    space. Weights are stored in float32: FD statistics are sensitive to feature round-off; the file is small.
    """
    from fewstep_search.metrics import heldout_accuracy, real_data_floor

    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    out = Path(out_dir)
    config = config or ClassifierConfig()
    split = digits_split()
    n = split.train_x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    with _fixed_threads(threads):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitsClassifier(config)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
        total = epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps=total, warmup=steps_per_epoch))
        t0, c0 = time.perf_counter(), time.process_time()
        with task_progress("pretrain classifier", total=total, enabled=progress) as tick:
            for _ in range(epochs):
                model.train()
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n, batch_size):
                    idx = perm[i : i + batch_size]
                    x = _shift(split.train_x[idx], gen, max_shift)
                    loss = nn.functional.cross_entropy(model(x), split.train_y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    tick()
        train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        model.eval()
        acc = heldout_accuracy(model)
        floor = real_data_floor(model)
    weights = out / CLASSIFIER_ASSET
    _save_weights(weights, model, config.to_dict(), dtype=torch.float32)
    card = {
        "name": "digits_classifier",
        "description": "CNN on 8x8 digits; its penultimate features define the Frechet distance (metrics.py)",
        "data": split.describe(),
        "architecture": config.to_dict(),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "training": {
            "function": "fewstep_search.pretrain.pretrain_classifier",
            "seed": seed,
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": "Adam (weight decay 1e-4)",
            "lr": lr,
            "augmentation": f"random translations up to {max_shift} px",
            "threads": threads,
            "torch": torch.__version__,
            "wall_seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
        },
        "metrics": {
            "heldout_accuracy": round(acc, 5),
            "fd_train_vs_heldout": round(floor, 5),
        },
    }
    atomic_write_json(out / CLASSIFIER_CARD_ASSET, card)
    return weights
