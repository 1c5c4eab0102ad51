r"""Invertible consistency distillation of a teacher UNet into a forward / reverse student pair.

    python -m icd_lite.distill --recipe G            # one configuration (the full method)
    python -m icd_lite.distill --recipe all          # every shipped pair (`make train-students`)

Both students start as the teacher (``students.student_from_teacher``); each iteration draws a
batch (z0, c) and applies the four updates of ``losses.icd_training_step`` in the paper's order
(method.md section 4). Optimizer: AdamW with a constant learning rate and gradient clipping 1.0, as
the release. Every ``--eval-every`` steps the pair is measured on held-out scenes (the curves of
the paper's Fig. 11): the reconstruction MSE of encode -> decode at w = 1, and the Frechet distance
of images generated at w = 8 with dynamic CFG to real images. Checkpoints are resumable
safetensors under ``build/train/students/``; the final weights are stored as float16 next to the
toy world's (``icd_lite/world/weights/student_<recipe>_{forward,reverse}.safetensors``), recorded
in its manifest, with the training curve as JSON.

The recipes are the configurations of the paper's Table 2 / Table 5 (m boundaries, preservation
losses on or off). ``--lora-rank`` trains peft LoRA adapters instead of full copies, as SD1.5 is
distilled.

The total objective of one iteration is the paper's eq. 5 (``losses`` writes each term out)::

    L = L_CD^+(theta+) + L_CD^-(theta-) + lambda_f L_f(theta-) + lambda_r L_r(theta+)

Recipes C, E and F ship bit-identical reverse students: without L_r (lambda_r = 0) nothing the
reverse student theta+ sees depends on the forward student, and the batch of step k (latents,
captions, eps, t, w) is drawn from ``batch_generator(100 + seed, k)``, re-seeded every step, so
the three runs feed theta+ the same numbers. Their generation curves (Fig. 11) coincide.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .components import Components, load_components
from .losses import ICDConfig, icd_training_step
from .device import add_device_arguments, configure_threads, resolve_device
from .pipeline import STUDENTS_DIR, ICDPipeline, save_students
from .schedule import Boundaries, default_boundaries
from .students import add_lora, merged_unet, student_from_teacher, trainable_parameters
from .world import checkpoints
from .world.scenes import make_dataset
from .world.train import batch_generator

CHECKPOINT_DIR = Path("build/train/students")
TRAIN_SEED, NUM_TRAIN = 0, 20000  # the teacher's training scenes (world/train.py)
EVAL_SEED = 11  # held-out scenes for the training curves
DEFAULT_BATCH = 32  # scenes per iteration (the release: 512, experiments.paper.DISTILL_BATCH)


@dataclass(frozen=True)
class Recipe:
    """One configuration of the paper's ablations: m boundaries and which losses train."""

    m: int
    lambda_f: float = 0.0
    lambda_r: float = 0.0
    forward_cd: bool = True
    about: str = ""
    w_code_choices: tuple = (0.0, 7.0, 11.0, 15.0, 19.0)  # w - 1 for the paper's {1, 8, ..., 20}
    forward_boundaries: tuple | None = None  # e.g. (249, 499, 699, 999); None: default_boundaries

    @property
    def boundaries(self) -> Boundaries:
        if self.forward_boundaries is None:
            return default_boundaries(self.m)
        upper = tuple(self.forward_boundaries)
        if len(upper) != self.m:
            raise ValueError(f"forward_boundaries {upper} must hold m = {self.m} endpoints")
        return Boundaries(reverse=(0,) + upper[:-1], forward=upper)

    def icd_config(self) -> ICDConfig:
        return ICDConfig(self.boundaries, self.w_code_choices, self.lambda_f,
                         self.lambda_r, forward_cd=self.forward_cd)


RECIPES = {
    "A": Recipe(2, about="fCD2 / CD2: consistency losses only"),
    "B": Recipe(3, about="fCD3 / CD3: consistency losses only"),
    "C": Recipe(4, about="fCD4 / CD4: consistency losses only"),
    "E": Recipe(4, lambda_f=1.5, forward_cd=False, about="fCD4 trained by L_f alone / CD4"),
    "F": Recipe(4, lambda_f=1.5, about="fCD4 + L_f / CD4"),
    "G": Recipe(4, lambda_f=1.5, lambda_r=1.5, about="fCD4 + L_f / CD4 + L_r (the full method)"),
    "G3": Recipe(3, lambda_f=1.5, lambda_r=1.5, about="fCD3 + L_f / CD3 + L_r (Table 5)"),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass
class LatentCaptions:
    """A training set in latent space: z0 [N, C, h, w], caption row per image, and the
    embeddings [K, L, D] of the K distinct captions (row 0 is the null prompt "")."""

    latents: torch.Tensor
    caption_index: torch.Tensor
    embeddings: torch.Tensor

    def batch(self, size: int, generator: torch.Generator):
        """(z0 [size, C, h, w], cond [size, L, D], null [size, L, D]), drawn with the CPU
        ``generator`` and returned on the latents' device."""
        index = torch.randint(len(self.latents), (size,), generator=generator)  # CPU
        index = index.to(self.latents.device)
        cond = self.embeddings[self.caption_index[index]]
        null = self.embeddings[:1].expand_as(cond)
        return self.latents[index], cond, null


@torch.no_grad()
def encode_dataset(components: Components, images: torch.Tensor, captions: list[str],
                   chunk: int = 500) -> LatentCaptions:
    """Encode images (VAE mean, scaled) and each distinct caption once."""
    unique = [""] + sorted(set(captions) - {""})
    row = {caption: i for i, caption in enumerate(unique)}
    latents = torch.cat([components.encode_images(part) for part in images.split(chunk)])
    embeddings = torch.cat([components.encode_prompt(unique[i:i + chunk])
                            for i in range(0, len(unique), chunk)])
    caption_index = torch.tensor([row[c] for c in captions], device=latents.device)
    return LatentCaptions(latents, caption_index, embeddings)


class TrainingCurve:
    """Fig. 11: reconstruction MSE (w = 1) and Frechet distance (w = 8, dynamic CFG) of the
    pair, measured on fixed held-out scenes."""

    def __init__(self, components: Components, n: int = 128, seed: int = EVAL_SEED):
        self.components = components
        self.perception = metrics.ToyPerception(components.clip, components.tokenizer)
        images, self.captions, _ = make_dataset(n, seed)
        self.images = images.to(components.device)  # [n, 3, 32, 32] in [-1, 1]
        self.real_features = self.perception.image_embeddings(self.images)

    @torch.no_grad()
    def __call__(self, forward, reverse, boundaries: Boundaries) -> dict:
        pipe = ICDPipeline.from_components(self.components, forward.unet, reverse.unet,
                                           boundaries)
        reconstruction = pipe.reconstruct(self.images, self.captions, w=1.0).images
        generated = pipe.generate(self.captions, w=8.0, tau=0.8, seed=1).images
        features = self.perception.image_embeddings(generated)
        return {"reconstruction_mse": metrics.mse(reconstruction, self.images).mean().item(),
                "frechet_distance": metrics.frechet_distance(features, self.real_features)}


def build_students(teacher_unet, lora_rank: int | None = None):
    """The forward (theta-, fCD_m) and reverse (theta+, CD_m) students, both starting as the
    teacher, returned in that order: ``forward, reverse = build_students(components.unet)``."""
    forward, reverse = student_from_teacher(teacher_unet), student_from_teacher(teacher_unet)
    if lora_rank:
        add_lora(forward, lora_rank)
        add_lora(reverse, lora_rank)
    return forward, reverse


def distill(components: Components, recipe: Recipe, data: LatentCaptions, steps: int,
            batch: int = DEFAULT_BATCH, lr: float = 1e-4, lora_rank: int | None = None,
            checkpoint: Path | None = None, save_every: int = 100, curve=None,
            eval_every: int = 100, seed: int = 0, init_pair=None, first_step: int = 0):
    """Train a student pair with ``recipe``; resume from ``checkpoint`` (a path stem) if saved.

    ``init_pair`` = (forward UNet, reverse UNet), e.g. a shipped pair, continues training from
    those weights at iteration ``first_step`` (fresh AdamW moments): the batches of steps
    first_step, first_step + 1, ... are those an uninterrupted run would have drawn.

    Returns (forward, reverse, history); history holds the losses of every step and the
    ``curve`` measurements (if given) every ``eval_every`` steps, with the training seconds.
    ``curve(forward, reverse, boundaries) -> dict`` is any measurement hook (``TrainingCurve``,
    or notebook 03's probe batch); its rows are the ones with a ``seconds`` key.
    """
    config = recipe.icd_config()
    teacher = components.eps_model()  # eps_phi(x, t, cond), the frozen teacher
    forward, reverse = build_students(components.unet, lora_rank)
    if init_pair is not None:
        for student, unet in zip((forward, reverse), init_pair):
            student.unet.load_state_dict(unet.state_dict())  # float16 on disk -> float32
    optimizers = {"forward": torch.optim.AdamW(trainable_parameters(forward), lr=lr,
                                               weight_decay=0.0),
                  "reverse": torch.optim.AdamW(trainable_parameters(reverse), lr=lr,
                                               weight_decay=0.0)}
    models = {"forward": forward, "reverse": reverse}
    start, history, seconds_before = _resume(checkpoint, models, optimizers, first_step)
    began = time.time()
    if curve is not None and not history:
        history.append({"step": start, "seconds": 0.0,
                        **curve(forward, reverse, config.boundaries)})
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="iCD")
    for step in bar:
        generator = batch_generator(100 + seed, step)  # re-seeded per step: same batch per recipe
        x0, cond, null = data.batch(batch, generator)  # (B, C, h, w), (B, L, D), (B, L, D)
        losses = icd_training_step(reverse, forward, teacher, optimizers["reverse"],
                                   optimizers["forward"], x0, cond, null, config, generator)
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()})
        history.append({"step": step + 1, **losses})
        done = step + 1 == steps
        if curve is not None and ((step + 1) % eval_every == 0 or done):
            seconds = seconds_before + time.time() - began
            history.append({"step": step + 1, "seconds": seconds,
                            **curve(forward, reverse, config.boundaries)})
        if checkpoint is not None and ((step + 1) % save_every == 0 or done):
            _save(checkpoint, models, optimizers, step + 1, history,
                  seconds_before + time.time() - began)
    return forward, reverse, history


def _save(stem: Path, models, optimizers, step: int, history, seconds: float) -> None:
    for role, model in models.items():
        checkpoints.save_state(Path(f"{stem}_{role}.safetensors"), model, optimizers[role],
                               step, kind=f"student_{role}", seconds=seconds)
    Path(f"{stem}_history.json").write_text(json.dumps(history))


def _resume(stem: Path | None, models, optimizers, first_step: int = 0):
    """(start step, history, seconds trained so far) from a checkpoint, or a fresh start."""
    if stem is None or not Path(f"{stem}_reverse.safetensors").exists():
        return first_step, [], 0.0
    steps = {role: checkpoints.load_state(Path(f"{stem}_{role}.safetensors"), model,
                                          optimizers[role], kind=f"student_{role}")
             for role, model in models.items()}
    if len(set(steps.values())) != 1:
        raise checkpoints.CheckpointError(f"the checkpoints {stem}_*.safetensors are from "
                                          f"different steps {steps}; delete them to restart")
    history = json.loads(Path(f"{stem}_history.json").read_text())
    history = [entry for entry in history if entry["step"] <= steps["reverse"]]
    print(f"iCD: resuming at step {steps['reverse']} from {stem}")
    return steps["reverse"], history, checkpoints.saved_seconds(
        Path(f"{stem}_reverse.safetensors"))


def ship(recipe_name: str, components: Components, forward, reverse, history, command: str,
         minutes: float) -> None:
    """Store the pair as float16 in the package (``save_pretrained``'s layout, less the modules
    shared with the toy world: ``pipeline.save_students``), with its manifest entries and curve."""
    folder = checkpoints.WEIGHTS_DIR / STUDENTS_DIR / recipe_name
    pipe = ICDPipeline.from_components(components, merged_unet(forward).half(),
                                       merged_unet(reverse).half(), RECIPES[recipe_name].boundaries)
    for path in save_students(pipe, folder):
        checkpoints.record(str(path.relative_to(checkpoints.WEIGHTS_DIR)), command,
                           train_minutes=minutes, recipe=recipe_name,
                           **asdict(RECIPES[recipe_name]))
    curve = [entry for entry in history if "reconstruction_mse" in entry]
    (folder / "training_curve.json").write_text(json.dumps(curve, indent=1) + "\n")


def load_curve(recipe_name: str) -> list[dict]:
    """The training curve (Fig. 11) recorded when the shipped pair was distilled."""
    get_recipe(recipe_name)
    path = checkpoints.WEIGHTS_DIR / STUDENTS_DIR / recipe_name / "training_curve.json"
    if not path.exists():
        raise checkpoints.CheckpointError(f"no training curve {path}; {checkpoints.REBUILD}")
    return json.loads(path.read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icd_lite.distill",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="G", help=f"one of {', '.join(RECIPES)}, or 'all'")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="train LoRA adapters of this rank instead of full copies")
    parser.add_argument("--eval-every", type=int, default=100)
    add_device_arguments(parser, threads=2)
    args = parser.parse_args(argv)
    names = list(RECIPES) if args.recipe == "all" else [args.recipe]
    for name in names:
        get_recipe(name)
    device = resolve_device(args.device)
    configure_threads(device, args.threads)
    command = "python -m icd_lite.distill " + " ".join(argv if argv is not None
                                                       else sys.argv[1:])
    components = load_components("toy", device=device)
    images, captions, _ = make_dataset(NUM_TRAIN, TRAIN_SEED)
    data = encode_dataset(components, images, captions)
    curve = TrainingCurve(components)
    for name in names:
        stem = CHECKPOINT_DIR / name
        forward, reverse, history = distill(components, RECIPES[name], data, args.steps,
                                            args.batch, args.lr, args.lora_rank, stem,
                                            curve=curve, eval_every=args.eval_every)
        minutes = round(checkpoints.saved_seconds(Path(f"{stem}_reverse.safetensors")) / 60, 1)
        ship(name, components, forward, reverse, history, f"{command} (recipe {name})",
             minutes)
        print(f"{name} ({RECIPES[name].about}): {minutes} min, {history[-1]}")


if __name__ == "__main__":
    main()
