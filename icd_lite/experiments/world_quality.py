"""The toy world measured against its quality bars (notebook 02, ``python -m icd_lite.bench world``).

* ``single_object_scenes``: random one-object scenes, their captions and rendered images;
* ``teacher_samples``: the teacher's images, DDIM with constant CFG (classical w) from seeded noise;
* ``measure_world``: VAE reconstruction PSNR, the toy CLIP's zero-shot accuracy on real and on
  VAE-decoded images (the ceiling of any generator's score), the teacher's attribute accuracy,
  CLIP-T and Frechet distance next to the distance between two real sets, and the training
  minutes of each stage from the weights manifest.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .. import metrics
from ..components import load_components
from ..guidance import classical_to_code, constant_guidance, guided_model
from ..solver import sample_ddim, sampling_timesteps
from ..world.checkpoints import read_manifest
from ..world.scenes import caption, make_dataset, random_scene, render


def single_object_scenes(n: int, seed: int):
    """n random single-object scenes with their captions and rendered images (on the CPU)."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, p_two_objects=0.0) for _ in range(n)]
    images = torch.from_numpy(np.stack([render(s)[0] for s in scenes]))
    return scenes, [caption(s) for s in scenes], images


@torch.no_grad()
def teacher_samples(components, prompts: list[str], w_classical: float, steps: int, seed: int,
                    batch: int = 250) -> torch.Tensor:
    """Images from the teacher: DDIM with constant CFG, fixed seed (the noise is drawn on the
    CPU and moved to the teacher's device)."""
    generator = torch.Generator().manual_seed(seed)
    guidance = constant_guidance(classical_to_code(w_classical))
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        cond = components.encode_prompt(chunk)
        null = components.encode_prompt([""] * len(chunk))
        config = components.unet.config
        shape = (len(chunk), config.in_channels, config.sample_size, config.sample_size)
        noise = torch.randn(shape, generator=generator).to(components.device)
        model = guided_model(components.eps_model(), null, guidance)
        latents = sample_ddim(model, noise, sampling_timesteps(steps), extra_args={"cond": cond},
                              disable=True)
        images.append(components.decode_latents(latents))
    return torch.cat(images)


def measure_world(n: int = 500, w_classical: float = 8.0, steps: int = 50,
                device: str | torch.device = "cpu") -> dict:
    """The world's quality numbers on ``n`` scenes (notebook 02, section 4). Keys:

    ``vae_psnr_db`` (mean, p05) on held-out scenes; ``clip_accuracy_on_real_images`` and
    ``clip_accuracy_on_decoded_images`` (the toy CLIP's zero-shot shape / color / background
    accuracy, the second the ceiling of any generator); ``teacher_attribute_accuracy``,
    ``teacher_clip_t``, ``real_clip_t`` and ``teacher_seconds`` for DDIM with ``steps`` steps at
    classical ``w_classical``; ``fd_teacher_vs_real`` (Frechet distance of CLIP image embeddings
    to real images of the *same* prompts) and ``fd_real_vs_real_floor``: the distance of a second
    real set of *other* scenes to the same reference. Despite its key's name, that one is no
    floor: it is usually the larger, because the generated set copies the reference's prompt list
    and an independent sample does not; it shows how far sampling alone moves an FD at this n.
    ``train_minutes`` of the clip / vae / unet from the weights manifest.
    """
    components = load_components("toy", device=device)
    device = components.device
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    results = {"n": n}

    real, _, _ = make_dataset(n, seed=1)
    real = real.to(device)
    with torch.no_grad():
        reconstruction = components.decode_latents(components.encode_images(real))
    psnr = metrics.psnr(reconstruction, real)
    results["vae_psnr_db"] = {"mean": psnr.mean().item(), "p05": psnr.quantile(0.05).item()}

    scenes, prompts, real_single = single_object_scenes(n, seed=2)
    real_single = real_single.to(device)
    results["clip_accuracy_on_real_images"] = perception.attribute_accuracy(real_single, scenes)
    with torch.no_grad():  # every generated image leaves through the decoder: the metric's ceiling
        decoded = components.decode_latents(components.encode_images(real_single))
    results["clip_accuracy_on_decoded_images"] = perception.attribute_accuracy(decoded, scenes)

    start = time.time()
    generated = teacher_samples(components, prompts, w_classical, steps, seed=3)
    results["teacher_seconds"] = time.time() - start
    results["teacher_attribute_accuracy"] = perception.attribute_accuracy(generated, scenes)
    results["teacher_clip_t"] = perception.clip_t(generated, prompts).mean().item()
    results["real_clip_t"] = perception.clip_t(real_single, prompts).mean().item()

    _, _, other_real = single_object_scenes(n, seed=4)
    other_real = other_real.to(device)
    features = {name: perception.image_embeddings(x) for name, x in
                [("generated", generated), ("real", real_single), ("other_real", other_real)]}
    results["fd_teacher_vs_real"] = metrics.frechet_distance(features["generated"],
                                                             features["real"])
    results["fd_real_vs_real_floor"] = metrics.frechet_distance(features["other_real"],
                                                                features["real"])
    manifest = read_manifest()
    results["train_minutes"] = {name: manifest[f"{name}.safetensors"]["train_minutes"]
                                for name in ("clip", "vae", "unet")}
    results["settings"] = {"w_classical": w_classical, "ddim_steps": steps}
    return results
