"""Tiny SD1.5-type components and data for ``icd_lite.sd15.train``, and its accelerate launch.

    python tests/sd15_train_launch.py [DIR]   # builds them in DIR, trains 2 iterations on 2
                                              # CPU processes, and prints where the LoRAs are

Components follow diffusers' ``get_dummy_components`` habit: built from configs, seeded, never
downloaded; saved as a diffusers folder (unet/, vae/, text_encoder/, tokenizer/) so that the
command line loads them with ``from_pretrained`` like the real model.

On a CPU, ``accelerate launch --cpu --num_processes 2`` starts ONE process unless an MPI
hostfile is given (accelerate 1.15's simple launcher); two gloo processes come from the torchrun
path: ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2`` (what
``launch`` runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

WORDS = ["a", "red", "blue", "green", "cat", "dog", "bird", "on", "the", "grass", "watercolor"]
RESOLUTION = 16  # pixels; the tiny VAE downsamples by 2 -> 8 x 8 latents
REPO = Path(__file__).resolve().parents[1]


def tiny_unet(seed: int = 0, time_cond_proj_dim=None) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        time_cond_proj_dim=time_cond_proj_dim).eval()


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(8, 16), norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, sample_size=RESOLUTION).eval()


def tiny_text(folder, seed: int = 0):
    """A real CLIP BPE tokenizer learnt offline (``icd_lite.sd15.fabricate``, the SD1.5
    loader's fixture) written to ``folder``, and a 1-layer CLIP text encoder of width 16."""
    from icd_lite.sd15.fabricate import bpe_tokenizer

    tokenizer = bpe_tokenizer(folder)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=tokenizer.model_max_length,
                            pad_token_id=tokenizer.pad_token_id,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return tokenizer, CLIPTextModel(config).eval()


def make_model_folder(folder, distilled_teacher: bool = False) -> Path:
    """A diffusers SD1.5-layout folder of tiny components; with ``distilled_teacher`` also
    ``folder/teacher`` (a UNet with time_cond_proj_dim, as dbaranchuk/sd15-cfg-distill-unet)."""
    folder = Path(folder)
    _, text_encoder = tiny_text(folder / "tokenizer")
    text_encoder.save_pretrained(folder / "text_encoder")
    tiny_vae().save_pretrained(folder / "vae")
    tiny_unet().save_pretrained(folder / "unet")
    if distilled_teacher:
        tiny_unet(time_cond_proj_dim=16).save_pretrained(folder / "teacher")
    return folder


def make_coco_data(folder, n: int = 8, seed: int = 0) -> Path:
    """COCO's layout: ``folder/train.csv`` (idx, file_name, caption) + ``folder/train/*.png``
    (20 x 16 px, so that Resize + CenterCrop both act)."""
    folder = Path(folder)
    (folder / "train").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["idx,file_name,caption"]
    for i in range(n):
        pixels = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "train" / f"{i:04d}.png")
        words = rng.choice(WORDS[1:], 3)
        rows.append(f"{i},{i:04d}.png,a {' '.join(words)}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def train_args(model, data, output, **options) -> list[str]:
    """The command line's arguments for a tiny run (options: --name value)."""
    args = ["--model", str(model), "--data", str(data), "--output", str(output),
            "--resolution", str(RESOLUTION), "--lora-rank", "4", "--lora-alpha", "4",
            "--recipe", "G", "--lr", "1e-3", "--eval-samples", "4", "--threads", "1"]
    for key, value in options.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def launch(args: list[str], num_processes: int = 2, timeout: int = 300):
    """``accelerate launch`` of ``python -m icd_lite.sd15.train`` on CPU processes (gloo)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", str(num_processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(29500 + os.getpid() % 1000),
               "-m", "icd_lite.sd15.train", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="icd-sd15-"))
    model, data = make_model_folder(root / "model"), make_coco_data(root / "data")
    result = launch(train_args(model, data, root / "out", steps=2, batch=4, micro_batch=1))
    print(result.stdout[-2000:], result.stderr[-2000:])
    print(f"LoRAs in {root / 'out'}" if result.returncode == 0 else "launch failed")
