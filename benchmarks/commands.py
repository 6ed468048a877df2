"""Memory and time of the commands users run: `fewstep-search search` and `run` with a study, as child processes.

Unlike `benchmarks/scale.py`, which measures the stages one by one through library calls, this measures the
command itself: the peak PSS of its whole process tree (the CLI, Ray's own processes and its workers; shared pages
counted once, from /proc/<pid>/smaps_rollup every 0.2 s, `scale.tree_pss`) and its wall time, from a fresh run
folder. Cases:

* `tiny-sd15`, `tiny-sd3`: the tests' tiny pipeline folders (16 x 16 pixels), 6 prompts, guidance 5: the
  pipeline path's fixed cost (Ray, diffusers, transformers);
* `sd15-unet`: SD1.5's UNet at full size (860 M parameters, random weights) at 64 x 64 latents, with a one-layer
  text encoder and a small VAE: a real architecture's footprint through the same path;
* `iso16384`: `scale.IsoMixture` at d = 16384 (4 x 64 x 64), K = 1024, M = 256, `project_dim` 256, float16
  storage: the bank and search of an SD-class latent at the target size.

Usage:
    python benchmarks/commands.py --cases tiny-sd15 tiny-sd3 --command search
    python benchmarks/commands.py --cases iso16384 --command search --timeout 3600
Results accumulate in `--out`/commands.json and rewrite the generated table of docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _blocks import replace_block  # noqa: E402
from scale import tree_pss  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "two green dots", "a yellow star", "a black line", "a white cloud"]
QUICK_SEARCH = """
[search]
heuristics = ["edm", "vp_time_quadratic"]
solvers = ["ddim", "ipndm"]
seconds = 20
trial_seconds = 10
[phase2]
max_steps = 6
batch_size = 4
steps_per_epoch = 3
pool_size = 8
end_to_end_teacher_steps = 4
"""


def _pipeline_study(folder: Path, *, pixels: int, bank: str) -> str:
    return (f'nfe = 4\n[model]\nkind = "pipeline"\npath = "{folder}"\noptions = {{ height = {pixels}, width = '
            f'{pixels} }}\n[prompts]\nfile = "prompts.txt"\nguidance_scale = 5.0\n{bank}{QUICK_SEARCH}')


def _sd15_unet_folder(folder: Path) -> Path:
    """SD1.5's UNet config (random weights), a one-layer CLIP text encoder of SD1.5's width, a small 8x VAE."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from fixtures_pipelines import _clip, _vp_scheduler, clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD1.5's UNet
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4)
    text = _clip(768)
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), unet=unet,
                            scheduler=_vp_scheduler(), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def sd15_call() -> None:
    """Build SD1.5's UNet (random weights, float32) and make one guided call at 64 x 64 latents (batch 2: the
    negative prompt and the prompt), as the tool's denoiser does; prints the call's seconds."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    x, text = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    t0 = time.perf_counter()
    with torch.no_grad():
        unet(x, torch.tensor([500.0, 500.0]), encoder_hidden_states=text)
    print(json.dumps({"call_seconds": round(time.perf_counter() - t0, 1)}))


def make_case(name: str, root: Path) -> Path:
    """Write the case's study (and its model folder) under `root`; returns the study file."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    small_bank = "[bank]\nn_trajectories = 24\ngrid_size = 24\nkeep_trajectories = 16\n"
    if name in ("tiny-sd15", "tiny-sd3"):
        from fixtures_pipelines import save_sd3, save_sd15

        folder = root / "pipeline"
        if not folder.is_dir():
            (save_sd15 if name == "tiny-sd15" else save_sd3)(folder)
        study = _pipeline_study(folder, pixels=16, bank=small_bank)
    elif name == "sd15-unet":
        folder = root / "pipeline"
        if not folder.is_dir():
            _sd15_unet_folder(folder)
        bank = "[bank]\nn_trajectories = 3\ngrid_size = 3\nsubsteps = 1\nprobes = 1\nkeep_trajectories = 1\n"
        study = _pipeline_study(folder, pixels=512, bank=bank)
    elif name == "iso16384":
        study = (f'nfe = 6\n[model]\nkind = "factory"\nfactory = "{HERE / "scale.py"}:iso_mixture"\n'
                 'options = { d = 16384 }\n[bank]\nn_trajectories = 1024\ngrid_size = 256\nsubsteps = 1\n'
                 'probes = 1\nproject_dim = 256\nstore_float16 = true\ndtype = "float32"\nkeep_trajectories = 256\n'
                 + QUICK_SEARCH)
    else:
        raise SystemExit(f"unknown case {name!r}; known: tiny-sd15, tiny-sd3, sd15-unet, iso16384")
    path = root / "study.toml"
    path.write_text(study)
    return path


def measure(argv: list[str], *, timeout: float, interval: float = 0.2) -> dict[str, Any]:
    """Run `argv`; its wall time, exit code and the peak PSS of its process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], int(tree_pss(proc.pid)))  # type: ignore[arg-type]
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out, err = proc.communicate(timeout=timeout)
        code: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = f"stopped after {timeout:.0f} s"
    stop.set()
    thread.join()
    tail = (err or "").strip().splitlines()[-1:] if code != 0 else []
    reported = [json.loads(line) for line in (out or "").splitlines() if line.startswith("{")]
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_gib": round(peak[0] / 2**30, 2), "exit": code,
            "error": tail[0] if tail else None, **(reported[-1] if reported else {})}


DENOISERS = (  # (model, denoiser parameters in billions, the text encoders the driver loads once, in billions)
    ("SD 1.5 (UNet)", 0.86, 0.12),
    ("SDXL (UNet)", 2.57, 0.82),
    ("SD3.5 medium (MMDiT)", 2.5, 5.5),
    ("SD3.5 large (MMDiT)", 8.1, 5.5),
    ("Flux.1 dev (transformer)", 11.9, 4.9),
)
LORA_SHARE = 0.01
"""Adapters' parameters as a share of the network's, rounded up: rank 16 on the attention projections of SD1.5's
UNet adds 3.19 M to 860 M (0.37%, counted on the meta device)."""


def extrapolation(bytes_per_weight: int = 2) -> str:
    """Per-GPU memory of each stage from the parameter counts, by the rule stated above the table."""
    gib = 2**30
    lines = ["| model | weights, bf16 (GiB) | encode prompts once (GiB) | bank, search, eval worker (GiB) | "
             "Phase-2 full fine-tune (GiB) | Phase-2 LoRA (GiB) | LoRA fits in |",
             "|---|---|---|---|---|---|---|"]
    for name, params, text in DENOISERS:
        w = params * 1e9 * bytes_per_weight / gib
        full = 6 * w  # teacher + student + EMA + gradients + two AdamW moments, all at the weights' width
        adapters = LORA_SHARE * params * 1e9 * 4 / gib  # fp32
        lora = w + 5 * adapters  # the base once; the adapters as student, EMA, gradients and two AdamW moments
        fits = next((f"{g} GB" for g in (24, 40, 80, 141) if lora * 1.3 < g * 1e9 / gib), "more than one GPU")
        lines.append(f"| {name} | {w:.1f} | {text * 1e9 * bytes_per_weight / gib:.1f} | {w:.1f} + activations | "
                     f"{full:.0f} + activations | {lora:.1f} + activations | {fits} |")
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| case | command | wall time (s) | peak PSS of the process tree (GiB) | exit |", "|---|---|---|---|---|"]
    for r in rows:
        what = f"`{r['command']}`" if r["command"].startswith("fewstep-search") else r["command"]
        if "call_seconds" in r:
            what += f" (the call: {r['call_seconds']} s)"
        lines.append(f"| {r['case']} | {what} | {r['seconds']} | {r['peak_gib']} | {r['exit']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["tiny-sd15", "tiny-sd3"])
    p.add_argument("--command", choices=("search", "run"), default="search")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=Path("runs/commands"))
    p.add_argument("--doc", type=Path, default=HERE.parent / "docs" / "scale.md")
    p.add_argument("--sd15-call", action="store_true", help="measure one guided call of SD1.5's full-size UNet "
                   "(its load and one step: what every stage pays per call) instead of a command")
    p.add_argument("--in-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.in_child:
        sd15_call()
        return 0
    results_file = args.out / "commands.json"
    rows = json.loads(results_file.read_text()) if results_file.is_file() else []
    cli = shutil.which("fewstep-search") or str(Path(sys.executable).with_name("fewstep-search"))
    if args.sd15_call:
        row = {"case": "sd15-unet", "command": "one guided call (batch 2, 64 x 64 latents), the UNet built",
               **measure([sys.executable, str(Path(__file__).resolve()), "--in-child"], timeout=args.timeout),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if (r["case"], r["command"]) != (row["case"], row["command"])] + [row]
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(rows, indent=2))
        args.cases = []
    for case in args.cases:
        study = make_case(case, args.out / case)
        run_dir = args.out / case / f"{args.command}-run"
        shutil.rmtree(run_dir, ignore_errors=True)
        extra = ["--rounds", "1"] if args.command == "run" else []
        row = {"case": case, "command": f"fewstep-search {args.command} --study STUDY {' '.join(extra)}".strip(),
               **measure([cli, args.command, "--study", str(study), "--out", str(run_dir), "--quiet", *extra],
                         timeout=args.timeout),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
        print(json.dumps(row), flush=True)
        rows = [r for r in rows if (r["case"], r["command"]) != (row["case"], row["command"])] + [row]
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(rows, indent=2))
    replace_block(args.doc, "commands", f"By `python benchmarks/commands.py --cases CASE --command search|run` a row "
                  f"(`--sd15-call` for the single call; {rows[-1]['machine']}, sharing the cores with other work)."
                  f"\n\n{table(rows)}")
    replace_block(args.doc, "extrapolation", extrapolation())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
