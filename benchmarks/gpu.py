"""GPU benchmark, d = 12288 (3 x 64 x 64, the ImageNet-64 size): bank throughput and search time on one GPU.

Run it where a CUDA device is lent; without CUDA it stops with one line. Two models:
* `conv`: a fixed random convolutional denoiser with EDM preconditioning (64 channels, 6 residual 3x3 conv blocks
  at 64 x 64, about 2 x 6 x 64 x 64 x 9 x 4096 = 3.6 GFLOP per sample evaluation): a network whose evaluation
  dominates, like the models this is for (measures the model-bound throughput);
* `iso`: `benchmarks/scale.py`'s exact isotropic mixture (two skinny matmuls per call): what the framework
  itself costs around the model.

Per model it reports: the in-process bank build on the GPU (trajectories/s, model evaluations/s, peak GPU
memory), the same bank built as shards by one Ray GPU task (`num_gpus=1`; checks the sharded path on a GPU), and
the library search (`search_schedules(bank=...)`, the default portfolio with `--refine-steps` Adam steps) at
N = `--nfe`, in process on the GPU. Prints a markdown table and writes `gpu.json` to `--out` ($OUT when set).

Usage:
    python benchmarks/gpu.py                          # both models, K = 256, M = 128
    python benchmarks/gpu.py --models conv --k 512 --grid 256 --refine-steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402 (benchmarks/ is not a package)
from scale import SIGMA_MAX, SIGMA_MIN, IsoMixture  # noqa: E402

SHAPE = (3, 64, 64)


class ConvDenoiser(nn.Module):
    """A fixed random residual conv net, EDM-preconditioned: D = c_skip x + c_out F(c_in x, log sigma)."""

    sigma_min, sigma_max, shape = SIGMA_MIN, SIGMA_MAX, SHAPE

    def __init__(self, channels: int = 64, blocks: int = 6, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Conv2d(SHAPE[0] + 1, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(blocks))
        self.out = nn.Conv2d(channels, SHAPE[0], 3, padding=1)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1)
        c_in, c_skip = 1 / torch.sqrt(1 + s**2), 1 / (1 + s**2)
        noise = (torch.log(s) / 4).expand(x.shape[0], 1, *x.shape[2:])
        h = torch.nn.functional.silu(self.inp(torch.cat([x * c_in, noise], 1)))
        for conv in self.blocks:
            h = h + torch.nn.functional.silu(conv(h)) * 0.5
        return c_skip * x + s * c_in * self.out(h)


def evaluations_per_trajectory(grid: int, *, substeps: int, probes: int, gain_substeps: int) -> tuple[int, int]:
    """(forward calls, vector-Jacobian calls) one trajectory of the bank costs (see docs/scale.md)."""
    return 4 * substeps * (grid - 1) + 1, 4 * probes * gain_substeps * (grid - 1)


def bench_model(name: str, den: nn.Module, *, k: int, grid: int, nfe: int, refine_steps: int,
                batch: int) -> dict[str, Any]:
    from fewstep_search.bank import BankPlan, build_bank
    from fewstep_search.bank_shards import assemble_from_shards, build_shards
    from fewstep_search.phase1.optimize import search_schedules
    from fewstep_search.phase1.portfolio import library_specs
    from fewstep_search.ray_runtime import ray_session

    den = den.to("cuda")
    opts = dict(substeps=1, probes=1, gain_substeps=1, dtype="float32", project_dim=256, store_float16=True,
                keep_states=False)
    fwd, vjp = evaluations_per_trajectory(grid, substeps=1, probes=1, gain_substeps=1)
    row: dict[str, Any] = {"model": name, "d": 12288, "K": k, "M": grid, "nfe": nfe}
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    bank = build_bank(den, shape=SHAPE, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=k, grid_size=grid,
                      device="cuda", batch_size=batch, model_id=name, **opts)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    row.update(build_s=sec, trajectories_per_s=k / sec, forward_evals_per_s=k * fwd / sec,
               vjp_evals_per_s=k * vjp / sec, build_gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30)
    plan = BankPlan(shape=SHAPE, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, n_trajectories=k, grid_size=grid,
                    model_id=name, **opts)  # type: ignore[arg-type]
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(scale)  # Ray workers cannot import benchmarks/scale.py by name
    with tempfile.TemporaryDirectory(prefix="fewstep_gpu_") as tmp, ray_session(workers=2):
        t0 = time.perf_counter()
        build_shards(den.cpu(), plan, tmp, device="cuda", batch_size=batch)
        row["sharded_build_1gpu_s"] = time.perf_counter() - t0
        sharded = assemble_from_shards(plan, tmp)
    den = den.to("cuda")
    row["sharded_max_abs_diff"] = float((sharded.x_end - bank.x_end).abs().max())
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, results = search_schedules(den, nfe=nfe, shape=SHAPE, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                                  bank=bank.to("cuda"), specs=library_specs(refine_steps=refine_steps),
                                  batch_size=batch)
    torch.cuda.synchronize()
    winner = results[nfe].winner
    row.update(search_s=time.perf_counter() - t0, search_gpu_peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               winner=winner.spec.label, winner_test_E=winner.test_error)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["conv", "iso"], choices=["conv", "iso"])
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--nfe", type=int, default=6)
    ap.add_argument("--refine-steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64, help="trajectories per chunk (bank and true error)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/gpu.py needs a CUDA device, and this torch ({torch.__version__}) sees none")
    rows = []
    for name in a.models:
        den = ConvDenoiser() if name == "conv" else IsoMixture(SHAPE)
        rows.append(bench_model(name, den, k=a.k, grid=a.grid, nfe=a.nfe, refine_steps=a.refine_steps,
                                batch=a.batch))
        print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name(0)
    print(f"\n{gpu}, torch {torch.__version__}, K = {a.k}, M = {a.grid}, N = {a.nfe}\n")
    print("| model | bank (s) | trajectories/s | forward evals/s | VJP evals/s | bank GPU peak (GiB) "
          "| sharded, 1 GPU task (s) | search (s) | search GPU peak (GiB) | winner (test E) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['build_s']:.1f} | {r['trajectories_per_s']:.1f} | {r['forward_evals_per_s']:.0f} | "
              f"{r['vjp_evals_per_s']:.0f} | {r['build_gpu_peak_gib']:.2f} | {r['sharded_build_1gpu_s']:.1f} | "
              f"{r['search_s']:.1f} | {r['search_gpu_peak_gib']:.2f} | {r['winner']} ({r['winner_test_E']:.4f}) |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu.json").write_text(json.dumps({"device": gpu, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
