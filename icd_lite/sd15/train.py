r"""Distil your own iCD LoRAs at SD1.5 scale, on one or several GPUs (accelerate, data parallel).

    accelerate launch --num_processes 8 --mixed_precision fp16 -m icd_lite.sd15.train \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --teacher dbaranchuk/sd15-cfg-distill-unet \
        --data data/train2014.csv --output build/icd-sd15 \
        --batch 512 --micro-batch 16 --steps 6000 --lr 8e-6

On CPUs (tests, a laptop): ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu
--num_processes 2 -m icd_lite.sd15.train ...`` gives two gloo processes; accelerate 1.15's
``--cpu --num_processes 2`` starts one process unless given an MPI hostfile. Measured here (2
shared CPU cores, tiny components of tests/sd15_train_launch.py): ~1.5 s per iteration of 4
samples (~2 s on a busy machine), a 2-process launch of 2 iterations ~40 s, most of it process
start-up.

Without ``--teacher`` the plain SD1.5 UNet is the teacher with real CFG (two passes: the caption
and the empty prompt), and the reverse student gets a trainable ``time_embedding.cond_proj``
(time_cond_proj_dim 512), zero-initialised so that step 0 equals the teacher for every w: one
reverse student then serves every w (the forward student only sees w = 0, where a zero
projection is the teacher exactly; its projection stays zero). With the authors' CFG-distilled
teacher (one pass, w embedded) the students keep its projection frozen and train LoRA only, as
the release did.

**The loop is the toy world's** (``icd_lite.distill``, ``icd_lite.losses``): the same four loss
functions, in the order of the paper's Algorithm 1, each followed by a step of its own AdamW
(yandex-research/invertible-cd, training/train_icd_sd15_lora.py; the numbers as collected in
``../shared/sd15_facts.md`` section 2)::

    1. L_CD(theta+)    reverse CD            -> reverse optimizer
    2. L_CD(theta-)    forward CD            -> forward optimizer
    3. lambda_f L_f    forward preservation  -> forward optimizer  (theta+ frozen)
    4. lambda_r L_r    reverse preservation  -> reverse optimizer  (theta- frozen)

Release settings are the defaults: LoRA rank 64, alpha 8 (scale 0.125) on the 14 module kinds
of ``students.SD15_LORA_TARGETS``; AdamW (0.9, 0.999), weight decay 0, eps 1e-8, constant lr
8e-6, gradient clip 1.0; pseudo-Huber c = 0.001; lambda_f = lambda_r = 1.5; w_code in
{0, 7, 11, 15, 19}; global batch 512, 6000 iterations. Not copied from the authors' script:
L_r gated on the L_f coefficient, ``seed + rank`` (here every process uses the same seed; the
data split, not the seed, makes the processes differ) and a resume that needs both checkpoint
kinds. Deviation: z0 is the VAE posterior *mean* (deterministic, so cached and
streamed runs agree), as the authors' inference; their training may sample.

**Data parallel and gradient accumulation.** The global batch B of one iteration is split into
shards of ``--micro-batch`` samples; process r of P takes shards r*k ... r*k+k-1 (k = B / (P *
micro-batch), the accumulation count). Each shard draws its own eps, timesteps and w from a
generator seeded by (seed, iteration, shard index), so the numbers a sample sees do not depend
on P or k. Each of the four updates runs over all of its shards before its optimizer steps:
backward of loss / k per shard, under ``accelerator.no_sync(model)`` for all but the last, whose
backward all-reduces (mean over P) the summed gradients; then clip, step, zero. The gradient is
thus the mean over the P*k equal shards of the per-shard mean loss: the gradient of the mean over
B, the same for any P x k = B / micro-batch, up to float summation order (tested: 2 gloo
processes x 2 shards against 1 process x 4 shards; Adam's division by sqrt(v) lets a gradient
component at rounding level move its weight by a fraction of lr, 3 elements in 18k there).
``accelerator.accumulate`` is not used on purpose: it ties one optimizer to one sync flag, and
with four interleaved updates the reverse optimizer would step on gradients that mix reverse CD
of this shard with L_r of earlier ones, and L_f would be computed with a reverse student not yet
updated by step 1. Only the two students are
``prepare``-d (DDP-wrapped); the frozen teacher, VAE and text encoder are not (DDP refuses
modules without trainable parameters and would all-reduce nothing). The frozen role of a student
inside an update (theta+ in L_f, theta- in L_r, both targets) runs under ``torch.no_grad``, so
DDP prepares no reduction for it.

**Memory per GPU** (ESTIMATES, not measured: no GPU was used; fp16 mixed precision, gradient
checkpointing, latents and text embeddings cached, 512 px). Fixed part, from parameter counts
of SD1.5's architecture (as in ``icd_lite.sd15.loading``): teacher UNet 859.7M fp16 1.72 GB;
two student bases fp16 3.44 GB; LoRA 2 x 67.3M fp32 0.54 GB; AdamW moments 1.08 GB; gradients
of one student at a time 0.27 GB plus DDP buckets 0.54 GB; CUDA context ~0.8 GB: about 8.4 GB.
Streaming adds the VAE (fp32 0.33 GB) and text encoder (fp16 0.25 GB) and their encode
activations. Activations: ~0.6 GB per sample
(estimate +-50%: block-level checkpoints of a 64x64 latent plus one recomputed transformer block
with SDPA attention, and the no-grad teacher/target passes), so:

    card    --micro-batch   estimated peak (upper)   accumulation k for B = 512 on 8 GPUs
    24 GB        8          ~13 GB (16 GB)           8
    40 GB       16          ~18 GB (23 GB)           4   (32 may fit: ~28 GB, upper 37 GB)
    80 GB       64          ~47 GB (66 GB)           1

Measure before a long run: one iteration at full size on the fabricated folder
(``python -m icd_lite.sd15.fabricate DIR --size full``, a CSV of a few images) with
``torch.cuda.max_memory_allocated``.

The Fig. 11 curve (reconstruction MSE of encode -> decode at w = 0 in latent space, on the
first ``--eval-samples`` rows of the data: training rows, not held out; the authors measured on
COCO val) is logged every ``--eval-every`` iterations with the losses to
``<output>/progress.csv`` and ``<output>/checkpoint/icd_history.json``; FID (or any metric) plugs
in through ``train(..., metrics=[fn])`` with ``fn(forward, reverse, boundaries) -> dict``.
Output: ``forward-19-259-519-779.safetensors`` / ``reverse-259-519-779-999.safetensors`` (the
release's layout: peft keys under ``unet.base_model.model.``, fp32, no alpha tensors: alpha is
8 by convention) plus ``cond_proj.safetensors`` (the reverse student's projection) when it was
trained, and ``icd_lora.json`` saying how to load them. Both kinds load straight into the SD1.5
loader (tested): pairs distilled from the CFG-distilled teacher with
``icd_lite.sd15.load_sd15_pipeline(None, teacher=..., loras=<output>, rank=None,
lora_alpha=8)``, pairs with a trained projection (real-CFG teacher) with
``load_sd15_pipeline(None, base=<model>, loras=<output>, cond_proj=<output>, rank=None,
lora_alpha=8)``. ``load_student_unet`` here reads one student onto a teacher in memory with the
loader's functions.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..consistency import decode, encode
from ..distill import _resume, _save, get_recipe
from ..guidance import guidance_embedding
from ..losses import (ICDConfig, forward_cd_loss, forward_preservation_loss, reverse_cd_loss,
                      reverse_preservation_loss)
from ..schedule import Boundaries
from ..students import SD15_LORA_TARGETS, UNetStudent, add_lora, student_from_teacher
from ..students import trainable_parameters
from . import data as sd15_data

PREFIX = "unet.base_model.model."  # the release's peft keys (HF dbaranchuk/icd-lora-sd15)


@dataclass
class TrainConfig:
    """One distillation run. Defaults: the SD1.5 release (invertible-cd training/README.md,
    sh_scripts/run_sd15_lora.sh)."""

    recipe: str = "G"  # icd_lite.distill.RECIPES: G = m 4, L_f and L_r on (the full method)
    steps: int = 6000  # iterations (each = 4 optimizer steps)
    batch: int = 512  # global batch B per iteration, all processes and shards together
    micro_batch: int = 8  # samples per forward/backward on one process
    lr: float = 8e-6
    lora_rank: int = 64
    lora_alpha: int = 8
    w_code_choices: tuple = (0.0, 7.0, 11.0, 15.0, 19.0)  # code unit: 0 = unguided
    seed: int = 0
    save_every: int = 100
    eval_every: int = 100
    eval_samples: int = 8  # rows of the data set used for the reconstruction curve
    gradient_checkpointing: bool = True

    def icd_config(self) -> ICDConfig:
        recipe = replace(get_recipe(self.recipe), w_code_choices=tuple(self.w_code_choices))
        return recipe.icd_config()


class Teacher(nn.Module):
    """eps of the frozen teacher UNet; ``embeds_guidance`` when it reads w (CFG-distilled).

    Real CFG is left to ``losses.reverse_cd_loss`` (two calls: caption, empty prompt); a
    CFG-distilled teacher is called once with ``w_code`` (0 when not given: forward CD).
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet.requires_grad_(False).eval()
        self.embeds_guidance = unet.config.time_cond_proj_dim is not None

    def forward(self, x, t, cond, w_code=None):
        dtype, kwargs = self.unet.dtype, {}
        if self.embeds_guidance:
            w = torch.zeros(x.shape[0]) if w_code is None else w_code.float().cpu()  # (B,)
            embedding = guidance_embedding(w, self.unet.config.time_cond_proj_dim)  # (B, 512)
            kwargs["timestep_cond"] = embedding.to(x.device, dtype)
        eps = self.unet(x.to(dtype), t, encoder_hidden_states=cond.to(dtype), **kwargs).sample
        return eps.float()  # (B, 4, h, w)


def build_students(teacher_unet, config: TrainConfig, weight_dtype=torch.float32) -> dict:
    """The forward and reverse students: teacher copies with LoRA (rank, alpha as released).

    A plain teacher gets a new zero-initialised ``cond_proj``, trained in the reverse student
    only: the forward one always sees w = 0, where a zero projection is exactly the teacher, so
    it stays zero and the forward LoRA loads onto the plain UNet. A CFG-distilled teacher keeps
    its own projection, frozen in both (the release). Frozen weights in ``weight_dtype``,
    trainable ones in float32.
    """
    distilled = teacher_unet.config.time_cond_proj_dim is not None
    students = {}
    for role in ("forward", "reverse"):
        student = UNetStudent(copy.deepcopy(teacher_unet)) if distilled \
            else student_from_teacher(teacher_unet)
        add_lora(student, config.lora_rank, SD15_LORA_TARGETS, lora_alpha=config.lora_alpha,
                 train_guidance=not distilled and role == "reverse", init_lora_weights=True)
        for p in student.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else weight_dtype)
        if config.gradient_checkpointing:
            student.unet.enable_gradient_checkpointing()
        students[role] = student.train()
    return students


class TrainableView(nn.Module):
    """The trainable tensors of a student (LoRA, cond_proj), sharing storage with it: what a
    checkpoint stores (2 x 67.3M parameters on SD1.5, not 2 x 860M)."""

    def __init__(self, student: nn.Module):
        super().__init__()
        for name, p in student.named_parameters():
            if p.requires_grad:
                self.register_parameter(name.replace(".", "__"), p)


@dataclass
class Shard:
    """One micro-batch and its own random numbers (eps here, t / w / segment in the losses)."""

    x0: torch.Tensor  # (b, 4, h, w) clean latents
    cond: torch.Tensor  # (b, L, D) caption embeddings
    null: torch.Tensor  # (b, L, D) empty-prompt embeddings
    eps: torch.Tensor  # (b, 4, h, w) the noise shared by the four losses
    generator: torch.Generator  # CPU; seeded by (seed, iteration, shard index)


def shard_plan(batch: int, micro_batch: int, num_processes: int) -> int:
    """k, the shards per process (gradient accumulation count); B must split evenly."""
    if batch <= 0 or micro_batch <= 0 or batch % (micro_batch * num_processes):
        raise ValueError(f"--batch {batch} must be a positive multiple of --micro-batch "
                         f"{micro_batch} x {num_processes} processes")
    return batch // (micro_batch * num_processes)


def local_shards(source, null, step: int, config: TrainConfig, rank: int, num_processes: int,
                 device) -> list[Shard]:
    """This process's shards of iteration ``step`` (the same global batch on every process)."""
    k = shard_plan(config.batch, config.micro_batch, num_processes)
    rows = sd15_data.shuffled_indices(len(source), step, config.batch, config.seed)  # (B,)
    shards = []
    for shard in range(rank * k, (rank + 1) * k):
        x0, cond = source.get(rows[shard * config.micro_batch:(shard + 1) * config.micro_batch])
        generator = torch.Generator().manual_seed(
            (config.seed * 1_000_003 + step) * 100_003 + shard)
        eps = torch.randn(x0.shape, generator=generator)  # (b, 4, h, w), on the CPU
        shards.append(Shard(x0.to(device), cond.to(device), null.expand_as(cond).to(device),
                            eps.to(device), generator))
    return shards


def _update(accelerator, model, optimizer, loss_fn, shards, weight: float, grad_clip: float):
    """One optimizer step on the mean of ``weight * loss_fn(shard)`` over all shards of all
    processes: local accumulation under no_sync, all-reduce on the last backward."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, shard in enumerate(shards):
        last = i == len(shards) - 1
        with nullcontext() if last else accelerator.no_sync(model):
            with accelerator.autocast():
                loss = loss_fn(shard)  # scalar: mean over the shard
            accelerator.backward(weight * loss / len(shards))
        total += loss.detach() / len(shards)
    accelerator.clip_grad_norm_(trainable_parameters(model), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(total, "mean").item()  # logged: the loss over the global batch


def icd_iteration(accelerator, forward, reverse, teacher, optimizers, shards,
                  config: ICDConfig) -> dict:
    """Algorithm 1, one iteration: the four updates of ``losses.icd_training_step`` in order,
    each over the whole global batch."""
    b, c, steps = config.boundaries, config.huber_c, config.num_ddim_steps
    clip, losses = config.grad_clip, {}
    # 1. reverse CD: f+(x_t, t -> s) ~ f+(x_t', t' -> s), x_t' = DDIM_teacher(x_t; w)
    losses["reverse_cd"] = _update(accelerator, reverse, optimizers["reverse"], lambda s: (
        reverse_cd_loss(reverse, teacher, s.x0, s.eps, s.cond, s.null, b, config.w_code_choices,
                        s.generator, huber_c=c, num_ddim_steps=steps)), shards, 1.0, clip)
    # 2. forward CD: f-(x_t, t -> s) ~ f-(x_t', t' -> s), x_t' = invDDIM_teacher(x_t; w = 0)
    if config.forward_cd:
        losses["forward_cd"] = _update(accelerator, forward, optimizers["forward"], lambda s: (
            forward_cd_loss(forward, teacher, s.x0, s.eps, s.cond, b, s.generator, huber_c=c,
                            num_ddim_steps=steps)), shards, 1.0, clip)
    # 3. forward preservation L_f: f-(f+(x_hi)) ~ x_hi, updates theta-
    if config.lambda_f > 0:
        losses["forward_preservation"] = _update(
            accelerator, forward, optimizers["forward"], lambda s: forward_preservation_loss(
                forward, reverse, s.x0, s.eps, s.cond, b, s.generator, huber_c=c),
            shards, config.lambda_f, clip)
    # 4. reverse preservation L_r: f+(f-(x_lo)) ~ x_lo, updates theta+
    if config.lambda_r > 0:
        losses["reverse_preservation"] = _update(
            accelerator, reverse, optimizers["reverse"], lambda s: reverse_preservation_loss(
                forward, reverse, s.x0, s.eps, s.cond, b, s.generator, huber_c=c),
            shards, config.lambda_r, clip)
    return losses


@torch.no_grad()
def reconstruction_mse(forward, reverse, boundaries: Boundaries, z0, cond, seed: int = 0):
    """Fig. 11's inversion curve, in latent space: mean (z0 - decode(encode(z0)))^2, w = 0,
    m jumps each way (encode starts at t = 19 with a fixed eps, as the release)."""
    x_T = encode(forward, z0, boundaries, cond, generator=torch.Generator().manual_seed(seed))
    return torch.mean((decode(reverse, x_T, boundaries, cond) - z0) ** 2).item()


def evaluate(accelerator, forward, reverse, boundaries, held_out, metrics=()) -> dict:
    """The curve's point (main process): reconstruction MSE plus any injected metric."""
    z0, cond = (t.to(accelerator.device) for t in held_out)
    forward, reverse = accelerator.unwrap_model(forward), accelerator.unwrap_model(reverse)
    with accelerator.autocast():
        point = {"reconstruction_mse": reconstruction_mse(forward, reverse, boundaries, z0, cond)}
        for metric in metrics:
            point.update(metric(forward, reverse, boundaries))
    return point


def write_progress(output: Path, history: list[dict]) -> None:
    """``progress.csv``: one row per logged entry (losses every iteration, curve points)."""
    columns = list(dict.fromkeys(key for entry in history for key in entry))
    with open(output / "progress.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, columns)
        writer.writeheader()
        writer.writerows(history)


def lora_file_names(boundaries: Boundaries) -> dict:
    """The release's names: the start timesteps of each student's jumps, e.g.
    forward-19-259-519-779 / reverse-259-519-779-999 for m = 4."""
    forward = [t for t, _ in boundaries.encoding_steps()]
    reverse = sorted(t for t, _ in boundaries.decoding_steps())
    return {"forward": "forward-" + "-".join(map(str, forward)) + ".safetensors",
            "reverse": "reverse-" + "-".join(map(str, reverse)) + ".safetensors"}


def export_pair(output: Path, students: dict, boundaries: Boundaries, config: TrainConfig,
                teacher_name: str) -> dict:
    """Write the two LoRA files (release layout), cond_proj (if trained) and icd_lora.json."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    names, cond_proj = lora_file_names(boundaries), {}
    for role, student in students.items():
        state = get_peft_model_state_dict(student.unet)  # '<module>.lora_A.weight', ...
        save_file({PREFIX + k: v.float().contiguous().cpu() for k, v in state.items()},
                  str(output / names[role]))
        weight = student.unet.time_embedding.cond_proj.weight
        if weight.requires_grad:  # the reverse student of a real-CFG teacher
            cond_proj[f"{role}.time_embedding.cond_proj.weight"] = weight.float().cpu()
    if cond_proj:
        save_file(cond_proj, str(output / "cond_proj.safetensors"))
        names["cond_proj"] = "cond_proj.safetensors"
    info = {"files": names, "lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha,
            "target_modules": SD15_LORA_TARGETS, "key_prefix": PREFIX,
            "boundaries": {"reverse": list(boundaries.reverse),
                           "forward": list(boundaries.forward)},
            "teacher": teacher_name, "guidance": _guidance_note(students, cond_proj),
            "w_unit": "code: 0 = unguided, 7 ~ classical 8", "config": asdict(config)}
    (output / "icd_lora.json").write_text(json.dumps(info, indent=1) + "\n")
    return names


def _guidance_note(students: dict, cond_proj: dict) -> str:
    dim = students["reverse"].unet.config.time_cond_proj_dim
    if cond_proj:
        return (f"teacher with real CFG; reverse student: trained cond_proj (time_cond_proj_dim "
                f"{dim}) in cond_proj.safetensors; forward student: zero cond_proj (= none)")
    return "the CFG-distilled teacher's cond_proj, unchanged, in both students"


def load_student_unet(output, role: str, teacher_unet):
    """A plain UNet of a trained student, read with the SD1.5 loader's own checks
    (``loading.read_lora``, ``read_cond_proj``, ``fused_student``): the teacher (for a real-CFG
    teacher: a copy with a guidance projection, the trained one for the reverse student and zero
    for the forward) with the LoRA file fused, rank and alpha from ``icd_lora.json``.

    ``load_sd15_pipeline(None, base=MODEL, loras=output, cond_proj=output, rank=None,
    lora_alpha=...)`` builds the whole pipeline from the same files; this reads one student onto
    a teacher already in memory (no VAE or text encoder: what the training tests compare)."""
    from . import loading

    output = Path(output)
    info = json.loads((output / loading.LORA_INFO_FILE).read_text())
    unet = copy.deepcopy(teacher_unet).float()
    if "cond_proj" in info["files"]:
        projections = loading.read_cond_proj(output / info["files"]["cond_proj"],
                                             loading.cond_proj_shape(unet))
        unet = loading.projected_unet(unet, projections.get(role))
    state, rank = loading.read_lora(output / info["files"][role], unet, info["lora_rank"],
                                    info["target_modules"])
    return loading.fused_student(unet, state, rank, info["lora_alpha"], copy_teacher=False).eval()


def train(accelerator, teacher_unet, source, config: TrainConfig, output, metrics=(),
          teacher_name: str = "") -> tuple[dict, list[dict]]:
    """Distil a forward/reverse pair from ``teacher_unet`` on ``source`` (``LatentCache`` or
    ``StreamedLatents``); resume from ``output/checkpoint`` if saved. Returns (students
    unwrapped, history). Every process calls it; the main one writes the files."""
    from accelerate.utils import set_seed

    output = Path(output)
    icd = config.icd_config()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32)
    shard_plan(config.batch, config.micro_batch, accelerator.num_processes)
    set_seed(config.seed)  # the same on every process: identical LoRA init (DDP also broadcasts)
    students = build_students(teacher_unet, config, weight_dtype)
    teacher_unet.to(accelerator.device)
    if teacher_unet.dtype != weight_dtype:
        teacher_unet.to(weight_dtype)
    teacher = Teacher(teacher_unet)
    optimizers = {role: torch.optim.AdamW(trainable_parameters(s), lr=config.lr,
                                          betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
                  for role, s in students.items()}
    forward, reverse, optimizers["forward"], optimizers["reverse"] = accelerator.prepare(
        students["forward"], students["reverse"], optimizers["forward"], optimizers["reverse"])
    views = {role: TrainableView(s) for role, s in students.items()}
    stem = output / "checkpoint" / "icd"
    start, history, seconds_before = _resume(stem, views, optimizers)
    held_out = source.get(range(min(config.eval_samples, len(source))))
    null = source.null  # (1, L, D)
    began = time.time()
    if start == 0 and accelerator.is_main_process and config.eval_every:
        history.append({"step": 0, "seconds": 0.0,
                        **evaluate(accelerator, forward, reverse, icd.boundaries, held_out,
                                   metrics)})
    for step in range(start, config.steps):
        shards = local_shards(source, null, step, config, accelerator.process_index,
                              accelerator.num_processes, accelerator.device)
        losses = icd_iteration(accelerator, forward, reverse, teacher, optimizers, shards, icd)
        seconds = seconds_before + time.time() - began
        history.append({"step": step + 1, "seconds": round(seconds, 3), **losses})
        done = step + 1 == config.steps
        if accelerator.is_main_process:
            print(f"iCD-SD1.5 {step + 1}/{config.steps} "
                  + " ".join(f"{k} {v:.5f}" for k, v in losses.items()), flush=True)
            if config.eval_every and ((step + 1) % config.eval_every == 0 or done):
                history.append({"step": step + 1, "seconds": round(seconds, 3),
                                **evaluate(accelerator, forward, reverse, icd.boundaries,
                                           held_out, metrics)})
            if (step + 1) % config.save_every == 0 or done:
                _save(stem, views, optimizers, step + 1, history, seconds)
                write_progress(output, history)
        accelerator.wait_for_everyone()
    unwrapped = {role: accelerator.unwrap_model(m) for role, m in
                 (("forward", forward), ("reverse", reverse))}
    if accelerator.is_main_process:
        export_pair(output, unwrapped, icd.boundaries, config, teacher_name)
    accelerator.wait_for_everyone()
    return unwrapped, history


def load_models(model: str, teacher: str | None = None):
    """(tokenizer, text encoder, VAE, teacher UNet) from a diffusers SD1.5 folder or hub id;
    ``teacher``: a CFG-distilled UNet folder / hub id (time_cond_proj_dim), else the plain UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    tokenizer = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(teacher) if teacher else \
        UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    return tokenizer, text_encoder.requires_grad_(False), vae.requires_grad_(False), unet.eval()


def prepare_source(accelerator, args, encoder):
    """The training rows: streamed, or a latent cache (built once, each process its share)."""
    pairs = sd15_data.open_source(args.data, args.images, args.resolution)
    if args.stream:
        return sd15_data.StreamedLatents(pairs, encoder)
    folder = Path(args.cache) if args.cache else Path(args.output) / "latents"
    cached = any(folder.glob("part-*-of-*.safetensors"))
    accelerator.wait_for_everyone()  # all look before any writes: else a late one sees a part
    if not cached:
        sd15_data.encode_to_cache(pairs, encoder, folder, accelerator.process_index,
                                  accelerator.num_processes, args.micro_batch)
    accelerator.wait_for_everyone()
    return sd15_data.LatentCache(folder)


def parse_args(argv=None):
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="python -m icd_lite.sd15.train",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="SD1.5 diffusers folder or hub id")
    parser.add_argument("--teacher", default=None,
                        help="CFG-distilled teacher UNet (folder / hub id); default: the "
                             "model's UNet with real CFG and a trained cond_proj")
    parser.add_argument("--data", required=True,
                        help="COCO-layout CSV (idx, file_name, caption), an image folder with "
                             ".txt captions, or webdataset shards (.tar)")
    parser.add_argument("--images", default=None, help="image folder of a CSV (default: the "
                        "CSV's stem beside it)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--cache", default=None, help="latent cache folder (default "
                        "OUTPUT/latents)")
    parser.add_argument("--stream", action="store_true",
                        help="encode images and captions in the loop instead of caching")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                        help="default: accelerate launch's setting")
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    for name in ("recipe", "steps", "batch", "micro_batch", "lr", "lora_rank", "lora_alpha",
                 "seed", "save_every", "eval_every", "eval_samples"):
        value = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    args = parser.parse_args(argv)
    config = TrainConfig(**{k: getattr(args, k) for k in (
        "recipe", "steps", "batch", "micro_batch", "lr", "lora_rank", "lora_alpha", "seed",
        "save_every", "eval_every", "eval_samples")},
        gradient_checkpointing=not args.no_gradient_checkpointing)
    get_recipe(config.recipe)
    for name in ("steps", "batch", "micro_batch", "lora_rank", "lora_alpha", "save_every"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not config.lr > 0:
        parser.error("--lr must be positive (the release: 8e-6)")
    return args, config


def main(argv=None) -> None:
    from accelerate import Accelerator

    args, config = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    shard_plan(config.batch, config.micro_batch, accelerator.num_processes)
    tokenizer, text_encoder, vae, unet = load_models(args.model, args.teacher)
    encoder = sd15_data.Encoder(vae.to(accelerator.device), text_encoder.to(accelerator.device),
                                tokenizer, accelerator.device)
    source = prepare_source(accelerator, args, encoder)
    if not args.stream:
        del encoder, vae, text_encoder  # cached: free their memory before training
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    train(accelerator, unet, source, config, output,
          teacher_name=args.teacher or f"{args.model} (real CFG)")
    if accelerator.is_main_process:
        names = lora_file_names(config.icd_config().boundaries).values()
        print(f"iCD-SD1.5: LoRA pair in {output} ({', '.join(names)})")
    accelerator.end_training()


if __name__ == "__main__":
    main()
