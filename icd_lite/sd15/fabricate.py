r"""A fabricated Stable Diffusion 1.5 with iCD release files: SD1.5's layout, random weights.

Nothing here downloads anything. As diffusers tests its pipelines (``get_dummy_components``),
the SD1.5 path is exercised on models built from configs; the files are written exactly where
and how the real ones are, so the loader cannot tell them apart::

    OUT/                                   the base model, diffusers' layout
      model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/
    OUT/sd15-cfg-distill-unet/             the CFG-distilled teacher (time_cond_proj_dim 512)
    OUT/sd15_cfg_distill.pt                the same as a torch state dict (tiny size only)
    OUT/icd-lora-sd15/forward-19-259-519-779.safetensors  reverse-259-519-779-999.safetensors ...
                                           peft keys unet.base_model.model.<module>.lora_A.weight,
                                           rank 64, no alpha tensors

``--size full`` is SD1.5's exact architecture (UNet 859.5 M parameters, VAE 83.7 M, text
encoder 123.1 M; a GPU bench folder, ~4.5 GB in float16); ``--size tiny`` keeps every block type
and the layer names the LoRAs target, with small widths, 128x128 images and 16x16 latents (a CPU
test folder, ~55 MB with all three releases, about five seconds of CPU). The tokenizer is a real
CLIP BPE (``vocab.json`` + ``merges.txt`` in CLIP's format, ``</w>`` word ends) learnt here on a
small word list, so that common words are one token and rarer ones ("watercolor", "sunflowers")
several, as with OpenAI's vocabulary; transformers' ``CLIPTokenizer`` reads it.

    python -m icd_lite.sd15.fabricate OUT --size tiny|full [--seed 0]

``load_sd15_pipeline(**fabricated_sources(OUT))`` then loads it. Deterministic: the same seed
writes the same weights.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import sys
from pathlib import Path

import torch

from ..components import ddim_scheduler
from ..students import SD15_LORA_TARGETS
from .loading import LORA_RANK, RELEASES, TEACHER_COND_DIM

TEACHER_DIR, TEACHER_PT, LORA_DIR, TOKENIZER_DIR = ("sd15-cfg-distill-unet", "sd15_cfg_distill.pt",
                                                    "icd-lora-sd15", "tokenizer")

# SD1.5's configs (stable-diffusion-v1-5/stable-diffusion-v1-5, unet/ vae/ text_encoder/)
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                 flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, act_fn="silu")
SD15_VAE = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4,
                layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                scaling_factor=0.18215, act_fn="silu")
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768)
TINY = {"unet": dict(sample_size=16, block_out_channels=(16, 16, 32, 32), cross_attention_dim=32,
                     attention_head_dim=2, norm_num_groups=8),
        "vae": dict(sample_size=128, block_out_channels=(8, 8, 16, 16), norm_num_groups=4),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, projection_dim=32)}

# The tokenizer's training words: common prompt words (weight 20: one token each), pieces of
# longer words (weight 3) and rarer words (weight 1), which end up split into several tokens.
COMMON_WORDS = ("a an the of on in with and at by photo picture painting drawing image cat dog "
                "horse bird car tree house man woman girl boy red blue green yellow black white "
                "brown small large big sitting standing running grass beach street table field "
                "sky water flowers flower forest mountain snow river city").split()
PIECES = "sun sky water color scraper light house flies berries apple".split()
RARE_WORDS = ("watercolor sunflowers skyscraper origami lighthouse cyberpunk astronaut giraffe "
              "strawberries pineapple chameleon butterflies").split()


# -- a CLIP BPE vocabulary -------------------------------------------------------------------
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map from bytes to printable characters: printable bytes map to
    themselves, the others to characters from U+0100 on."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_bpe(word_counts: dict[str, int], min_count: int = 3) -> list[tuple[str, str]]:
    """BPE merges (Sennrich et al. 2016) as CLIP learns them: words as byte characters whose
    last one carries ``</w>``; repeatedly merge the most frequent adjacent pair (ties: the
    smallest pair) until no pair occurs ``min_count`` times."""
    byte = bytes_to_unicode()
    words = collections.Counter()
    for word, count in word_counts.items():
        chars = [byte[b] for b in word.encode()]
        chars[-1] += "</w>"
        words[tuple(chars)] += count
    merges = []
    while True:
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_count:
            return merges
        merges.append(best)
        words = collections.Counter({_merge_pair(w, best): c for w, c in words.items()})


def write_bpe_tokenizer(folder: Path) -> Path:
    """``vocab.json`` + ``merges.txt`` (+ ``tokenizer_config.json``) in CLIP's format: the 256
    byte characters, the same with ``</w>``, one token per merge, then <|startoftext|> and
    <|endoftext|>; prompts padded to 77 tokens with <|endoftext|> as SD1.5's are."""
    counts = {**{w: 1 for w in RARE_WORDS}, **{w: 3 for w in PIECES},
              **{w: 20 for w in COMMON_WORDS}}
    merges = learn_bpe(counts)
    byte_chars = list(bytes_to_unicode().values())
    tokens = (byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
              + ["<|startoftext|>", "<|endoftext|>"])
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n"
                                                                    for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
         "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
         "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, indent=1))
    return folder


def bpe_tokenizer(folder: Path | None = None):
    """transformers' ``CLIPTokenizer`` over the fabricated BPE files (written to ``folder``,
    or to a temporary folder)."""
    import tempfile

    from transformers import CLIPTokenizer

    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="icd_bpe_"))
    return CLIPTokenizer.from_pretrained(str(write_bpe_tokenizer(Path(folder))))


# -- the models ------------------------------------------------------------------------------
def configs(size: str) -> dict[str, dict]:
    """The UNet, VAE and text-encoder configs of ``size`` ("tiny" or "full")."""
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', got {size!r}")
    unet, vae, text = dict(SD15_UNET), dict(SD15_VAE), dict(SD15_TEXT)
    if size == "tiny":
        unet.update(TINY["unet"])
        vae.update(TINY["vae"])
        text.update(TINY["text"])
    return {"unet": unet, "vae": vae, "text": text}


def build_models(size: str, tokenizer, seed: int = 0) -> dict[str, torch.nn.Module]:
    """Randomly initialised base UNet, CFG-distilled teacher (the base plus a random
    ``time_embedding.cond_proj``), VAE and text encoder; seeded, without touching the global
    random state."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = configs(size)
    text_config = dict(config["text"], bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if size == "tiny":
        text_config["vocab_size"] = len(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        teacher = UNet2DConditionModel(**config["unet"], time_cond_proj_dim=TEACHER_COND_DIM)
        teacher.load_state_dict(unet.state_dict(), strict=False)  # SD1.5 + a random cond_proj
    return {"unet": unet, "teacher": teacher, "vae": vae, "text_encoder": text_encoder}


def release_loras(teacher, rank: int, seeds: list[int]) -> list[dict[str, torch.Tensor]]:
    """LoRA state dicts with the released layout, one per seed, made as the authors' training
    made them: peft's ``get_peft_model(unet, LoraConfig(r, target_modules=SD15_LORA_TARGETS))``
    (alpha left at peft's default 8), here with random A and B (B is zero at peft's init), then
    ``get_peft_model_state_dict`` and diffusers' ``unet.`` prefix."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    model = get_peft_model(copy.deepcopy(teacher), LoraConfig(r=rank,
                                                              target_modules=SD15_LORA_TARGETS))
    states = []
    for seed in seeds:  # one injection, new values per file
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_" in name:  # std 1/sqrt(fan-in) for A, 0.5 for B: a visible update
                    std = parameter[0].numel() ** -0.5 if ".lora_A." in name else 0.5
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        states.append({"unet." + key: tensor.contiguous().clone()
                       for key, tensor in get_peft_model_state_dict(model).items()})
    return states


def fabricated_sources(folder) -> dict:
    """The keyword arguments of ``load_sd15_pipeline`` for a fabricated folder."""
    folder = Path(folder)
    return {"base": folder, "teacher": folder / TEACHER_DIR, "loras": folder / LORA_DIR}


def fabricate_model(out, size: str = "tiny", seed: int = 0, releases=None, rank: int | None = None,
              dtype: torch.dtype | None = None, write_pt: bool | None = None) -> Path:
    """Write the fabricated folder (see the module docstring) and return it.

    ``releases``: which LoRA pairs (default: all three at tiny size, "4step-v1" at full);
    ``rank``: 64, the released one; ``dtype`` of the model files (float32 at
    tiny, float16 at full; the LoRAs are float32 as released); ``write_pt``: also the teacher as
    a ``.pt`` state dict (default at tiny only)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    out = Path(out)
    releases = releases or (list(RELEASES) if size == "tiny" else ["4step-v1"])
    rank = rank or LORA_RANK
    dtype = dtype or (torch.float32 if size == "tiny" else torch.float16)
    write_pt = size == "tiny" if write_pt is None else write_pt
    tokenizer = bpe_tokenizer(out / TOKENIZER_DIR)
    models = build_models(size, tokenizer, seed)
    scheduler = ddim_scheduler()
    base = StableDiffusionPipeline(models["vae"], models["text_encoder"], tokenizer,
                                   models["unet"], scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if dtype != torch.float32:
        base.to(dtype=dtype)
    base.save_pretrained(out)
    write_bpe_tokenizer(out / TOKENIZER_DIR)  # CLIP's two files next to transformers' json
    teacher = models["teacher"]
    if write_pt:
        torch.save(teacher.state_dict(), out / TEACHER_PT)
    files = [file for name in releases for file in RELEASES[name].files]
    seeds = [1000 * seed + i + 1 for i in range(len(files))]
    (out / LORA_DIR).mkdir(parents=True, exist_ok=True)
    for file, state in zip(files, release_loras(teacher, rank, seeds)):
        save_file(state, str(out / LORA_DIR / file))
    teacher.to(dtype).save_pretrained(out / TEACHER_DIR, safe_serialization=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icd_lite.sd15.fabricate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--releases", nargs="+", choices=list(RELEASES), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 4))
    out = fabricate_model(args.out, args.size, args.seed, args.releases)
    print(f"wrote a {args.size} fabricated SD1.5 with iCD LoRAs to {out}; load it with "
          f"icd_lite.load_sd15_pipeline(**icd_lite.sd15.fabricated_sources({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
