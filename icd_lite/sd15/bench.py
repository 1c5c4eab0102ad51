r"""Speed and memory of editing at SD1.5 scale: ``python -m icd_lite.sd15.bench --model DIR``.

In one process, on one 512x512 image (the VAE's size) and one prompt pair, it reports:

* seconds per edit for iCD (4 + 4 = 8 NFE, P2P on the decoder) and for DDIM50 + P2P,
  NPI + P2P and NTI + P2P on plain SD1.5 with two-pass CFG (``editing.baseline_edit``);
* the *floor* of an iCD edit, the same work without any bookkeeping: text encoder on both
  prompts, VAE encode, 4 forward-UNet passes (batch 1), 4 reverse-UNet passes (batch 2, the
  source and target branches), VAE decode (batch 2); and iCD's wall time over that floor;
* the floor of DDIM50 + P2P likewise (50 inversion passes, 50 x 2 CFG passes on batch 2);
* memory: the weights of the full load (base UNet + two student UNets + VAE + text encoder)
  counted from the modules, ``torch.cuda.memory_allocated`` after loading, and the peak of each
  editor (``torch.cuda.max_memory_allocated``, reset before each); plus the fused-vs-adapter
  table of the full architecture in float16, counted on the ``meta`` device;
* ``--compile``: the same with ``torch.compile(mode="reduce-overhead")`` on the two student
  UNets and the VAE decoder (eager is the default). A P2P edit installs new attention
  processors on every call, which makes dynamo recompile (or fall back to eager), so the
  compiled figures to read are the floor and prompt-switch editing (8 NFE, no P2P).

Every time is the median of ``--runs`` runs after ``--warmup`` runs (NTI: ``--nti-runs``, no
warm-up by default); CUDA is synchronised around each run. The JSON (``--out``) records the
counts. ``--model`` is a folder written by ``python -m icd_lite.sd15.fabricate`` (random
weights: times and memory are those of the real model, images are noise); ``--base``,
``--teacher`` and ``--loras`` point at real files instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ..device import add_device_arguments, configure_threads, resolve_device
from ..editing import P2PSettings, baseline_edit, icd_edit, prompt_switch_edit
from .fabricate import configs, fabricated_sources
from .loading import LORA_RANK, TEACHER_COND_DIM, load_sd15_pipeline, lora_modules
from .pipeline import AdapterView

SOURCE = "a photo of a cat sitting on the grass"
TARGET = "a photo of a tiger sitting on the grass"
BLEND = [(("cat",), ("tiger",))]
AMPLIFY = [("tiger",)]
W_ICD, TAU, W_TEACHER = 20.0, 0.8, 7.5  # classical: the authors' 19 in the code unit; P2P's 7.5
GB = 1e9


def weight_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of ``modules``, each tensor counted once."""
    seen, total = set(), 0
    for module in modules:
        if module is None:
            continue
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def architecture_table(dtype=torch.float16, rank: int = LORA_RANK) -> dict:
    """Weights in GB of the full SD1.5 load, fused students vs peft adapters, counted from the
    exact architecture on the ``meta`` device (no memory, no files)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = configs("full")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"])
        teacher = UNet2DConditionModel(**config["unet"], time_cond_proj_dim=TEACHER_COND_DIM)
        vae = AutoencoderKL(**config["vae"])
        text = CLIPTextModel(CLIPTextConfig(**config["text"]))
    size = torch.tensor([], dtype=dtype).element_size()
    count = {name: sum(p.numel() for p in m.parameters())
             for name, m in [("unet", unet), ("teacher", teacher), ("vae", vae), ("text", text)]}
    modules = dict(teacher.named_modules())
    count["lora"] = sum(rank * (modules[name].weight[0].numel() + modules[name].weight.shape[0])
                        for name in lora_modules(teacher))  # A: r x fan-in, B: fan-out x r
    shared = count["unet"] + count["vae"] + count["text"]
    fused = shared + 2 * count["teacher"]
    adapters = shared + count["teacher"] + 2 * count["lora"]
    return {"parameters_millions": {k: round(v / 1e6, 2) for k, v in count.items()},
            "lora_modules": len(lora_modules(teacher)), "dtype": str(dtype).split(".")[-1],
            "fused_GB": round(fused * size / GB, 2), "adapters_GB": round(adapters * size / GB, 2)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, runs: int, warmup: int) -> dict:
    """Median seconds of ``runs`` calls of ``fn`` after ``warmup`` calls, and the peak GPU
    memory over the timed calls (GB; None on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = []
    for _ in range(runs):
        _sync(device)
        begin = time.perf_counter()
        fn()
        _sync(device)
        seconds.append(time.perf_counter() - begin)
    peak = torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None
    return {"median_s": statistics.median(seconds), "runs": runs, "warmup": warmup,
            "all_s": [round(s, 4) for s in seconds],
            "peak_GB": None if peak is None else round(peak, 3)}


@torch.no_grad()
def icd_floor(pipe, image):
    """The bare work of one iCD edit (see the module docstring), as a function to time."""
    base = pipe.base
    steps = pipe.boundaries.m
    x = torch.randn((1, *pipe.latent_shape), device=pipe.device, dtype=pipe.vae.dtype)
    t = torch.full((1,), 500, device=pipe.device)
    w = torch.zeros(512 if pipe.forward_unet.config.time_cond_proj_dim is None else
                    pipe.forward_unet.config.time_cond_proj_dim, device=pipe.device)

    def run():
        cond = base.encode_prompt([SOURCE, TARGET])  # (2, 77, D)
        base.encode_images(image)
        h = x
        for _ in range(steps):
            h = pipe.forward_unet(h, t, encoder_hidden_states=cond[:1],
                                  timestep_cond=w[None].to(h.dtype)).sample
        h = h.repeat(2, 1, 1, 1)  # (2, C, h, w): source and target branches
        for _ in range(steps):
            h = pipe.reverse_unet(h, t.repeat(2), encoder_hidden_states=cond,
                                  timestep_cond=w[None].repeat(2, 1).to(h.dtype)).sample
        base.decode_latents(h)
    return run


@torch.no_grad()
def ddim_floor(pipe, steps: int = 50):
    """The bare UNet work of DDIM50 + P2P: ``steps`` passes at batch 1, 2 x ``steps`` at 2."""
    unet = pipe.base.unet
    x = torch.randn((1, *pipe.latent_shape), device=pipe.device, dtype=pipe.vae.dtype)
    cond = pipe.base.encode_prompt([SOURCE, TARGET])
    t = torch.full((1,), 500, device=pipe.device)

    def run():
        for _ in range(steps):
            unet(x, t, encoder_hidden_states=cond[:1])
        pair = x.repeat(2, 1, 1, 1)
        for _ in range(2 * steps):
            unet(pair, t.repeat(2), encoder_hidden_states=cond)
    return run


def compile_pipeline(pipe) -> None:
    """torch.compile(mode="reduce-overhead") on the student UNets and the VAE decoder, in place
    (the baselines' UNet stays eager: NTI differentiates through it)."""
    for module in (pipe.forward_unet, pipe.reverse_unet, pipe.vae.decoder):
        if module is not None and isinstance(module, torch.nn.Module):
            module.compile(mode="reduce-overhead")


def run_bench(sources: dict, device="auto", runs: int = 5, warmup: int = 2,
              baseline_steps: int = 50, nti_inner_steps: int = 10, nti_runs: int = 1,
              compile: bool = False, fuse: bool = True, release: str = "4step-v1",
              pipe=None, baselines: bool = True) -> dict:
    """Load (or take ``pipe``, already loaded), then time every editor on one image; returns
    the report (see the module docstring)."""
    device = resolve_device(device) if pipe is None else pipe.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    begin = time.perf_counter()
    if pipe is None:
        pipe = load_sd15_pipeline(release, device=device, fuse=fuse, **sources)
    fuse = not isinstance(pipe.forward_unet, AdapterView)
    report = {"device": str(device), "dtype": str(pipe.vae.dtype).split(".")[-1],
              "fused": fuse, "compiled": compile, "load_s": round(time.perf_counter() - begin, 2),
              "image_size": pipe.base.image_size, "boundaries": list(pipe.boundaries.reverse),
              "weights_GB": round(weight_bytes(pipe.forward_unet, pipe.reverse_unet,
                                               pipe.base_unet, pipe.vae, pipe.text_encoder)
                                  / GB, 3)}
    if device.type == "cuda":
        report["allocated_after_load_GB"] = round(
            (torch.cuda.memory_allocated(device) - before) / GB, 3)
    if compile:
        compile_pipeline(pipe)
    size = pipe.base.image_size
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand((1, 3, size, size), generator=generator) * 2 - 1).to(device)
    p2p = P2PSettings()
    editors = {
        "icd_p2p": lambda: icd_edit(pipe, image, SOURCE, TARGET, W_ICD, TAU, p2p, BLEND,
                                    AMPLIFY),
        "icd_prompt_switch": lambda: prompt_switch_edit(pipe, image, SOURCE, TARGET, W_ICD,
                                                        TAU),
        "icd_floor": icd_floor(pipe, image),
    }
    if baselines:
        editors["ddim_floor"] = ddim_floor(pipe, baseline_steps)
    for method in ("ddim", "npi", "nti") if baselines else ():
        editors[f"{method}_p2p"] = (lambda m=method: baseline_edit(
            pipe.base, image, SOURCE, TARGET, m, W_TEACHER, baseline_steps, p2p, BLEND, AMPLIFY,
            nti_inner_steps))
    report["nfe"] = {"icd_p2p": icd_edit(pipe, image, SOURCE, TARGET, W_ICD, TAU, p2p, BLEND,
                                         AMPLIFY).nfe}
    report["times"] = {}
    for name, fn in editors.items():
        slow = name == "nti_p2p"
        report["times"][name] = timed(fn, device, nti_runs if slow else runs,
                                      0 if slow else warmup)
    times = report["times"]
    report["icd_over_floor"] = round(times["icd_p2p"]["median_s"]
                                     / times["icd_floor"]["median_s"], 3)
    report["ratios_to_icd"] = {name: round(t["median_s"] / times["icd_p2p"]["median_s"], 2)
                               for name, t in times.items()}
    if device.type == "cuda":
        report["peak_GB"] = round(torch.cuda.max_memory_allocated(device) / GB, 3)
    report["settings"] = {"w_icd_classical": W_ICD, "tau": TAU, "w_teacher_classical": W_TEACHER,
                          "baseline_steps": baseline_steps, "nti_inner_steps": nti_inner_steps,
                          "p2p": vars(p2p)}
    return report


def print_report(report: dict) -> None:
    print(f"SD1.5 edit bench on {report['device']} ({report['dtype']}, "
          f"{'fused' if report['fused'] else 'adapters'}, "
          f"{'compiled' if report['compiled'] else 'eager'}), {report['image_size']}^2 image")
    print(f"{'editor':20s} {'median s':>9s} {'x iCD':>7s} {'peak GB':>8s}  runs")
    for name, t in report["times"].items():
        peak = "-" if t["peak_GB"] is None else f"{t['peak_GB']:.2f}"
        print(f"{name:20s} {t['median_s']:9.4f} {report['ratios_to_icd'][name]:7.2f} "
              f"{peak:>8s}  median of {t['runs']} after {t['warmup']} warm-up")
    print(f"iCD edit / its floor: {report['icd_over_floor']:.2f} (target <= 1.3); weights "
          f"loaded {report['weights_GB']:.2f} GB; load {report['load_s']:.1f} s")
    if "architecture" in report:
        table = report["architecture"]
        print(f"full SD1.5 weights in {table['dtype']}: fused {table['fused_GB']} GB, "
              f"adapters {table['adapters_GB']} GB ({table['parameters_millions']})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icd_lite.sd15.bench",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (also used by ``python -m icd_lite.bench sd15``)."""
    parser.add_argument("--model", help="a folder written by python -m icd_lite.sd15.fabricate")
    parser.add_argument("--base", help="SD1.5 (hub id or folder), instead of --model")
    parser.add_argument("--teacher", help="CFG-distilled teacher (hub id, folder or .pt)")
    parser.add_argument("--loras", help="LoRA repository or folder")
    parser.add_argument("--release", default="4step-v1")
    add_device_arguments(parser, threads=1, threads_help="CPU threads for torch (one is "
                         "fastest for tiny models on a busy machine), ignored on a GPU")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="the baselines' DDIM steps")
    parser.add_argument("--nti-inner", type=int, default=10)
    parser.add_argument("--nti-runs", type=int, default=1)
    parser.add_argument("--adapters", action="store_true", help="peft adapters, not fused")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="time iCD only (DDIM / NPI / NTI + P2P take minutes)")
    parser.add_argument("--compile", action="store_true",
                        help='torch.compile(mode="reduce-overhead") the UNets and VAE decoder')
    parser.add_argument("--out", default="build/bench/sd15.json")


def run_from_args(args) -> int:
    try:
        configure_threads(args.device, args.threads)
    except ValueError as error:  # e.g. --device cuda without a CUDA GPU: one line, no traceback
        print(f"python -m icd_lite.bench sd15: error: {error}", file=sys.stderr)
        return 2
    if args.model:
        sources = fabricated_sources(args.model)
    else:
        sources = {}
    for name in ("base", "teacher", "loras"):
        if getattr(args, name):
            sources[name] = getattr(args, name)
    report = run_bench(sources, args.device, args.runs, args.warmup, args.steps, args.nti_inner,
                       args.nti_runs, args.compile, not args.adapters, args.release,
                       baselines=not args.skip_baselines)
    report["architecture"] = architecture_table()
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
