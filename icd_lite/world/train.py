"""Train the toy world from scratch on a CPU: CLIP and the VAE, then CLIP's image tower on
decoded images, then the teacher UNet.

    python -m icd_lite.world.train            # everything (what `make train` runs)
    python -m icd_lite.world.train --stage vae

Each stage shows a tqdm bar, writes a resumable checkpoint (weights + AdamW state, safetensors)
to ``build/train/`` every ``--save-every`` steps, and at the end copies its final weights into
``icd_lite/world/weights/`` and records them in the manifest (sha256, command, commit).

1. CLIP: a ViT image tower and the text tower, trained contrastively (InfoNCE) on
   (image, caption) pairs, as CLIP was. Its text tower becomes the frozen text encoder.
2. VAE: AutoencoderKL, L1 reconstruction of the posterior *mean* + 1e-6 KL (SD's first stage
   without its GAN and LPIPS terms; decoding the mean rather than a sample converges several
   times faster on a CPU budget, and encoding always uses the mean anyway, method.md section
   5). The latent scaling factor is then measured as 1 / std of the latents, as SD's 0.18215 was.
3. CLIP on decoded images: every image the teacher and the students make leaves through the
   VAE decoder, which softens corners. The CLIP of stage 1 named the shape of 97 % of held-out
   real images but of only 86 % of their VAE reconstructions (measured), so it under-counted every
   generator's shape accuracy. Its image tower (and projection) is fine-tuned contrastively on
   batches of half real images and half their reconstructions, with the text tower frozen, so the
   text encoder - and the teacher conditioned on it - stays exactly the same.
4. Teacher: UNet2DConditionModel predicting eps on scaled VAE latents with SD1.5's schedule,
   captions dropped 10% of the time so that classifier-free guidance works; min-SNR-5 loss
   weights (see ``min_snr_weight``); EMA of the weights.

`make train-world` keeps both cores busy: CLIP and the VAE train side by side on one core each,
the VAE takes both cores once CLIP is done; then stage 3 and the teacher's first steps share
them, and the teacher finishes on both (``--until-step`` stops a stage where the next run
resumes).

``--device`` (default auto: CUDA when available, else the CPU) picks where the models train;
``--threads`` is the CPU threads (ignored on a GPU). Every batch is drawn from the step's CPU
generator and then moved to the device, so the CPU runs draw exactly the batches they always
did, and checkpoints and shipped weights are written from CPU copies of the state.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..device import add_device_arguments, configure_threads, resolve_device
from ..schedule import SD15_SCHEDULE
from . import checkpoints, loading
from .models import build_clip, build_unet, build_vae, text_encoder_from_clip
from .scenes import make_dataset
from .text import build_tokenizer, tokenize

CHECKPOINT_DIR = Path("build/train")
TRAIN_SEED, NUM_TRAIN = 0, 20000


def cosine_lr(optimizer, steps: int, warmup: int = 100):
    """Linear warm-up, then cosine decay to 0."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_generator(stage_seed: int, step: int) -> torch.Generator:
    """The random stream of one step: a resumed run draws exactly the batches it would have."""
    return torch.Generator().manual_seed(stage_seed * 1_000_003 + step)


def data_parallel() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless started by ``torchrun``.

    Under ``torchrun --nproc_per_node 2`` each process computes the loss of its half of every
    batch on one core and the processes average their gradients (``average_gradients``), so
    the step is the one-process step on the whole batch. For the teacher on this 2-core CPU
    that is ~1.2x faster than one process with two threads (measured: 297-300 against
    333-370 ms per batch of 64).
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def average_gradients(model) -> None:
    """Sum the processes' gradients in one message (a flat tensor) and divide by their number."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, averaged in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(averaged.view_as(grad))


def run_stage(name: str, model, loss_fn, steps: int, lr: float, save_every: int,
              extra_models: dict | None = None, until: int | None = None,
              rank: int = 0, processes: int = 1) -> float | None:
    """The loop shared by the stages: AdamW, cosine schedule, resumable checkpoints.

    ``loss_fn(step)`` returns the loss of one batch; ``extra_models`` (e.g. an EMA copy) are
    saved beside the model and updated by the caller. Returns the stage's training time in
    minutes, summed over resumed runs - or None when it stopped at step ``until`` < ``steps``
    (`make train-world` runs part of a stage on one core and resumes it on two).
    With ``processes`` > 1 (``torchrun``, see ``data_parallel``) the gradients are averaged over
    the processes and only ``rank`` 0 saves.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = cosine_lr(optimizer, steps)
    path = CHECKPOINT_DIR / f"{name}.safetensors"
    start, seconds_before, began = 0, 0.0, time.time()
    if path.exists():
        start = checkpoints.load_state(path, model, optimizer, kind=name)
        seconds_before = checkpoints.saved_seconds(path)
        for extra, module in (extra_models or {}).items():
            checkpoints.load_state(CHECKPOINT_DIR / f"{extra}.safetensors", module, kind=extra)
        for _ in range(start):
            scheduler.step()
        print(f"{name}: resuming at step {start} from {path}")
    stop = steps if until is None else min(until, steps)
    bar = tqdm(range(start, stop), initial=start, total=steps, desc=name, disable=rank > 0)
    for step in bar:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if processes > 1:
            average_gradients(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if rank == 0 and ((step + 1) % save_every == 0 or step + 1 == stop):
            seconds = seconds_before + time.time() - began
            checkpoints.save_state(path, model, optimizer, step + 1, kind=name, seconds=seconds)
            for extra, module in (extra_models or {}).items():
                checkpoints.save_state(CHECKPOINT_DIR / f"{extra}.safetensors", module,
                                       step=step + 1, kind=extra)
    if processes > 1:
        dist.barrier()  # the last checkpoint is written before any process reads it
    if stop < steps:
        return None
    return round(checkpoints.saved_seconds(path) / 60, 1)


def ship(name: str, model, command: str, **extra) -> None:
    """Copy final weights into the package and record them in the manifest (with the stage's
    training time in minutes, on the machine that ran it)."""
    checkpoints.save_state(checkpoints.WEIGHTS_DIR / f"{name}.safetensors", model, kind=name)
    checkpoints.record(f"{name}.safetensors", command, **extra)


def train_clip(images, captions, tokenizer, steps: int, batch: int, save_every: int, command,
               device="cpu"):
    torch.manual_seed(1)
    clip = build_clip(tokenizer).to(device)
    tokens = tokenize(tokenizer, captions)

    def loss_fn(step):
        index = torch.randint(len(images), (batch,), generator=batch_generator(1, step))
        return clip(input_ids=tokens.input_ids[index].to(device),
                    attention_mask=tokens.attention_mask[index].to(device),
                    pixel_values=images[index].to(device), return_loss=True).loss

    minutes = run_stage("clip", clip, loss_fn, steps, 1e-3, save_every)
    ship("clip", clip.eval(), command, train_minutes=minutes)
    return clip


def train_vae(images, steps: int, batch: int, save_every: int, command, until=None,
              device="cpu"):
    torch.manual_seed(2)
    vae = build_vae().to(device)

    def loss_fn(step):
        index = torch.randint(len(images), (batch,), generator=batch_generator(2, step))
        x = images[index].to(device)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.mean).sample
        return (reconstruction - x).abs().mean() + 1e-6 * posterior.kl().mean()

    minutes = run_stage("vae", vae, loss_fn, steps, 1e-3, save_every, until=until)
    if minutes is None:  # a later run resumes, finishes and ships it
        return None
    vae.eval()
    with torch.no_grad():
        sample = images[:5000]  # enough to measure a standard deviation
        latents = torch.cat([vae.encode(chunk.to(device)).latent_dist.mean
                             for chunk in sample.split(500)])
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    ship("vae", vae, command, scaling_factor=scaling_factor, train_minutes=minutes)
    return vae


def finetune_clip_on_decoded(clip, vae, images, captions, tokenizer, steps: int, batch: int,
                             save_every: int, command, device="cpu"):
    """Stage 3: the image tower learns to read VAE reconstructions (text tower frozen). The
    decoded images are kept beside ``images`` (on the CPU); the models run on ``device``."""
    stage_1 = checkpoints.read_manifest()["clip.safetensors"]
    if "decoded_command" in stage_1 and not (CHECKPOINT_DIR / "clip_decoded.safetensors").exists():
        raise RuntimeError("the shipped CLIP is already fine-tuned on decoded images; run "
                           "`--stage clip` first to retrain it from scratch")
    clip, vae = clip.to(device), vae.to(device)
    clip.requires_grad_(False)
    clip.vision_model.requires_grad_(True)
    clip.visual_projection.requires_grad_(True)
    tokens = tokenize(tokenizer, captions)
    with torch.no_grad():
        decoded = torch.cat([
            vae.decode(vae.encode(chunk.to(device)).latent_dist.mean).sample.clamp(-1, 1)
            .to(images.device) for chunk in tqdm(images.split(500), desc="decoding")])

    def loss_fn(step):
        generator = batch_generator(4, step)
        index = torch.randint(len(images), (batch,), generator=generator)
        from_decoder = (torch.rand(batch, generator=generator) < 0.5)[:, None, None, None]
        pixels = torch.where(from_decoder, decoded[index], images[index])
        return clip(input_ids=tokens.input_ids[index].to(device),
                    attention_mask=tokens.attention_mask[index].to(device),
                    pixel_values=pixels.to(device), return_loss=True).loss

    contrastive = stage_1.get("contrastive_minutes", stage_1["train_minutes"])
    minutes = run_stage("clip_decoded", clip.train(), loss_fn, steps, 3e-4, save_every)
    ship("clip", clip.eval(), stage_1["command"], contrastive_minutes=contrastive,
         decoded_command=command, decoded_minutes=minutes,
         train_minutes=round(contrastive + minutes, 1))
    return clip


def min_snr_weight(t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight for eps-prediction (Hang et al. 2023): min(SNR_t, gamma) / SNR_t.

    ||eps_hat - eps||^2 = SNR_t ||x0_hat - x0||^2, so the plain eps loss weighs the nearly clean
    steps (SNR_t large: textures) far above the noisy ones that decide layout and shape. The weight
    caps that emphasis at gamma; it is 1 for every t with SNR_t <= gamma (t >= 147 here).
    The result is on the device of ``t`` (the schedule's table lives on the CPU).
    """
    alpha_bar = SD15_SCHEDULE.alphas_cumprod[t.cpu()].to(t.device)
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


@torch.no_grad()
def teacher_data(clip, vae, images, captions, tokenizer, device="cpu"):
    """The teacher's training set from the shipped CLIP and VAE: scaled latents [N, 4, 8, 8] and
    the text embeddings of every distinct caption (row 0 = ""), on ``device``, and each image's
    caption row [N] (on the CPU)."""
    text_encoder = text_encoder_from_clip(clip).to(device)
    vae = vae.to(device)
    unique = [""] + sorted(set(captions))
    embeddings = text_encoder(**tokenize(tokenizer, unique).to(device)).last_hidden_state
    latents = torch.cat([vae.encode(c.to(device)).latent_dist.mean for c in images.split(500)])
    latents = latents * vae.config.scaling_factor
    row = {caption: i for i, caption in enumerate(unique)}
    return latents, torch.tensor([row[c] for c in captions], device="cpu"), embeddings


def train_teacher(latents, caption_index, text_embeddings, steps: int, batch: int,
                  save_every: int, command, caption_dropout: float = 0.1, until=None,
                  rank: int = 0, processes: int = 1, device="cpu"):
    """latents: [N, 4, 8, 8] scaled; caption_index: [N] rows of text_embeddings (row 0 = "").

    ``rank`` / ``processes``: this process's share of every batch under ``torchrun``. The UNet
    trains on ``device``; each batch is drawn on the CPU and moved there."""
    torch.manual_seed(3)
    share = slice(rank, None, processes)  # this process's samples of every batch
    unet = build_unet(cross_attention_dim=text_embeddings.shape[-1]).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    text_embeddings = text_embeddings.to(device)

    def loss_fn(step):
        generator = batch_generator(3, step)
        if step > 0:  # EMA of the weights after the previous optimizer step
            decay = min(0.999, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - decay)
        # drawn on the CPU in this order (a resumed run draws the same batches), then moved
        index = torch.randint(len(latents), (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < caption_dropout
        t = torch.randint(1, 1000, (batch,), generator=generator)
        eps = torch.randn((batch, *latents.shape[1:]), generator=generator)
        index, dropped, t, eps = (v[share].to(device) for v in (index, dropped, t, eps))
        x0 = latents[index.to(latents.device)].to(device)
        rows = caption_index[index.to(caption_index.device)].to(device)
        rows = torch.where(dropped, 0, rows)
        x_t = SD15_SCHEDULE.add_noise(x0, eps, t)
        prediction = unet(x_t, t, text_embeddings[rows]).sample
        squared_error = ((prediction - eps) ** 2).mean(dim=(1, 2, 3))
        return torch.mean(min_snr_weight(t) * squared_error)

    minutes = run_stage("teacher", unet, loss_fn, steps, 1e-3, save_every,
                        extra_models={"teacher_ema": ema}, until=until, rank=rank,
                        processes=processes)
    if minutes is None or rank > 0:  # a later run resumes and ships it / rank 0 ships it
        return None
    ship("unet", ema.eval(), command, train_minutes=minutes)
    return ema


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=["all", "clip", "vae", "clip-decoded", "teacher"],
                        default="all")
    parser.add_argument("--clip-steps", type=int, default=4000)
    parser.add_argument("--clip-decoded-steps", type=int, default=1500)
    parser.add_argument("--vae-steps", type=int, default=12000)
    parser.add_argument("--teacher-steps", type=int, default=3200)
    parser.add_argument("--save-every", type=int, default=250)
    add_device_arguments(parser, threads=2)
    parser.add_argument("--until-step", type=int, default=None,
                        help="vae / teacher: stop after this step; a later run resumes there")
    args = parser.parse_args(argv)
    if args.until_step is not None and args.stage not in ("vae", "teacher"):
        parser.error("--until-step applies to --stage vae or --stage teacher only")
    rank, processes = data_parallel()
    if processes > 1 and args.stage != "teacher":
        parser.error("only --stage teacher runs in several processes (torchrun); CLIP's "
                     "contrastive loss needs whole batches and the other stages are small")
    try:
        device = resolve_device(args.device)
        configure_threads(device, args.threads)
    except ValueError as error:
        parser.error(str(error))
    if processes > 1 and device.type != "cpu":
        parser.error("the torchrun data parallelism of --stage teacher splits a CPU's cores "
                     "(gloo); on a GPU run one process: python -m icd_lite.world.train")
    launcher = "python -m" if processes == 1 else f"torchrun --nproc_per_node {processes} -m"
    command = f"{launcher} icd_lite.world.train " + " ".join(argv if argv is not None
                                                             else sys.argv[1:])
    start = time.time()
    images, captions, _ = make_dataset(NUM_TRAIN, TRAIN_SEED)
    tokenizer = build_tokenizer()
    quiet = rank > 0  # under torchrun, rank 0 reports
    if not quiet:
        print(f"dataset: {len(images)} scenes in {time.time() - start:.0f} s")
    stages = ["clip", "vae", "clip-decoded", "teacher"] if args.stage == "all" else [args.stage]
    times = {}
    for stage in stages:
        begin = time.time()
        if stage == "clip":
            train_clip(images, captions, tokenizer, args.clip_steps, 128, args.save_every,
                       command, device=device)
        elif stage == "vae":
            train_vae(images, args.vae_steps, 16, args.save_every, command, args.until_step,
                      device=device)
        elif stage == "clip-decoded":
            finetune_clip_on_decoded(loading.load_clip(tokenizer, device),
                                     loading.load_vae(device), images,
                                     captions, tokenizer, args.clip_decoded_steps, 128,
                                     args.save_every, command, device=device)
        else:
            latents, caption_index, embeddings = teacher_data(
                loading.load_clip(tokenizer, device), loading.load_vae(device), images, captions,
                tokenizer, device)
            train_teacher(latents, caption_index, embeddings, args.teacher_steps, 64,
                          args.save_every, command, until=args.until_step, rank=rank,
                          processes=processes, device=device)
        times[stage] = time.time() - begin
        if not quiet:
            print(f"{stage}: {times[stage] / 60:.1f} min")
    if not quiet:
        print(f"total: {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
