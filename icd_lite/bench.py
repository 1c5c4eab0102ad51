"""Benchmarks that print figures: ``python -m icd_lite.bench world | inversion``.

``world`` measures the shipped toy world against its quality bars and writes
``build/bench/world.json``:

* VAE reconstruction PSNR on held-out scenes (bar: >= 30 dB);
* the toy CLIP's zero-shot attribute accuracy on *real* held-out images (how far the metric
  itself can be trusted);
* the teacher, DDIM 50 steps with CFG w = 8 (classical) on random single-object prompts:
  attribute accuracy for shape, object colour and background colour (bar: >= 95 % each), CLIP-T,
  and the Frechet distance to real images next to the distance between two real sets of the
  same size (the floor);
* the training time of each stage, from the weights manifest.

``inversion`` prints the analogues of the paper's Table 2 (reconstruction of held-out images by
every shipped student pair and by DDIM50) and Table 6 (seconds and NFE per inversion of one
image for iCD, DDIM50, NPI and NTI, measured side by side in this process, as ratios to iCD), and
writes ``build/bench/inversion.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import evaluation, metrics
from .components import load_components
from .distill import load_pipelines
from .guidance import classical_to_code, constant_guidance, guided_model
from .solver import sample_ddim, sampling_timesteps
from .world.checkpoints import read_manifest
from .world.scenes import caption, make_dataset, random_scene, render

OUT_DIR = Path("build/bench")


def single_object_scenes(n: int, seed: int):
    """n random single-object scenes with their captions and rendered images."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, p_two_objects=0.0) for _ in range(n)]
    images = torch.from_numpy(np.stack([render(s)[0] for s in scenes]))
    return scenes, [caption(s) for s in scenes], images


@torch.no_grad()
def teacher_samples(components, prompts: list[str], w_classical: float, steps: int, seed: int,
                    batch: int = 250) -> torch.Tensor:
    """Images from the teacher: DDIM with constant CFG, fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    guidance = constant_guidance(classical_to_code(w_classical))
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        cond = components.encode_prompt(chunk)
        null = components.encode_prompt([""] * len(chunk))
        config = components.unet.config
        shape = (len(chunk), config.in_channels, config.sample_size, config.sample_size)
        noise = torch.randn(shape, generator=generator)
        model = guided_model(components.eps_model(), null, guidance)
        latents = sample_ddim(model, noise, sampling_timesteps(steps), extra_args={"cond": cond},
                              disable=True)
        images.append(components.decode_latents(latents))
    return torch.cat(images)


def bench_world(n: int = 500, w_classical: float = 8.0, steps: int = 50) -> dict:
    components = load_components("toy")
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    results = {"n": n}

    real, _, _ = make_dataset(n, seed=1)
    with torch.no_grad():
        reconstruction = components.decode_latents(components.encode_images(real))
    psnr = metrics.psnr(reconstruction, real)
    results["vae_psnr_db"] = {"mean": psnr.mean().item(), "p05": psnr.quantile(0.05).item()}

    scenes, prompts, real_single = single_object_scenes(n, seed=2)
    results["clip_accuracy_on_real_images"] = perception.attribute_accuracy(real_single, scenes)

    start = time.time()
    generated = teacher_samples(components, prompts, w_classical, steps, seed=3)
    results["teacher_seconds"] = time.time() - start
    results["teacher_attribute_accuracy"] = perception.attribute_accuracy(generated, scenes)
    results["teacher_clip_t"] = perception.clip_t(generated, prompts).mean().item()
    results["real_clip_t"] = perception.clip_t(real_single, prompts).mean().item()

    _, _, other_real = single_object_scenes(n, seed=4)
    features = {name: perception.image_embeddings(x) for name, x in
                [("generated", generated), ("real", real_single), ("other_real", other_real)]}
    results["fd_teacher_vs_real"] = metrics.frechet_distance(features["generated"],
                                                             features["real"])
    results["fd_real_vs_real_floor"] = metrics.frechet_distance(features["other_real"],
                                                                features["real"])
    results["train_minutes"] = {name.split(".")[0]: entry.get("train_minutes")
                                for name, entry in read_manifest().items()}
    results["settings"] = {"w_classical": w_classical, "ddim_steps": steps}
    return results


def print_world(results: dict) -> None:
    acc, clip_acc = results["teacher_attribute_accuracy"], results["clip_accuracy_on_real_images"]
    rows = [
        ("VAE reconstruction PSNR (dB), held-out", f"{results['vae_psnr_db']['mean']:.2f} "
         f"(5th percentile {results['vae_psnr_db']['p05']:.2f})", ">= 30"),
        *[(f"teacher attribute accuracy: {k}", f"{100 * v:.1f} %", ">= 95 %")
          for k, v in acc.items()],
        *[(f"CLIP zero-shot accuracy on real images: {k}", f"{100 * v:.1f} %", "(metric check)")
          for k, v in clip_acc.items()],
        ("teacher CLIP-T / real images' CLIP-T", f"{results['teacher_clip_t']:.3f} / "
         f"{results['real_clip_t']:.3f}", ""),
        ("Frechet distance teacher vs real / real vs real",
         f"{results['fd_teacher_vs_real']:.4f} / {results['fd_real_vs_real_floor']:.4f}", ""),
        *[(f"training time: {k}", f"{v} min", "total <= 45 min")
          for k, v in results["train_minutes"].items()],
    ]
    width = max(len(r[0]) for r in rows)
    print(f"toy world, n = {results['n']}, teacher DDIM{results['settings']['ddim_steps']} "
          f"w = {results['settings']['w_classical']:g} ({results['teacher_seconds']:.0f} s)")
    for name, value, bar in rows:
        print(f"  {name:<{width}}  {value:<28} {bar}")


def bench_inversion(n: int = 200, timing_images: int = 3) -> dict:
    components = load_components("toy")
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    pipes = load_pipelines(components)
    images, captions, _ = make_dataset(n, seed=21)
    table2 = evaluation.table2(pipes, components, images, captions, perception)
    timing = evaluation.timing(pipes["G"], components, images[:timing_images],
                               captions[:timing_images])
    return {"n": n, "table2": table2, "table6": timing}


def format_table(rows: list[dict], columns: dict[str, str]) -> str:
    """Rows of dicts as aligned text; ``columns`` maps a key to its format (e.g. ".2f")."""
    cells = [[f"{row[key]:{fmt}}" if row[key] is not None else "-"
              for key, fmt in columns.items()] for row in rows]
    widths = [max(len(key), *(len(line[i]) for line in cells))
              for i, key in enumerate(columns)]
    lines = ["  ".join(key.ljust(w) for key, w in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def print_inversion(results: dict) -> None:
    print(f"Table 2 analogue: reconstruction of {results['n']} held-out toy images "
          f"(PSNR up, LPIPS-like down, DinoV2-like up)")
    print(format_table(results["table2"], {"config": "s", "nfe": "d", "psnr": ".2f",
                                           "lpips_like": ".4f", "dino_like": ".4f"}))
    print(f"\nTable 6 analogue: one image at a time, w = 8, mean of "
          f"{results['table6'][0]['images']} images, this process")
    print(format_table(results["table6"], {"method": "s", "nfe": ".0f", "seconds": ".3f",
                                           "time_ratio_to_icd": ".1f", "psnr": ".2f"}))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icd_lite.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["world", "inversion"])
    parser.add_argument("--n", type=int, default=None,
                        help="images / prompts per measurement (world: 500, inversion: 200)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.suite == "world":
        results = bench_world(args.n or 500)
        print_world(results)
    else:
        results = bench_inversion(args.n or 200)
        print_inversion(results)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{args.suite}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
