r"""The command line: ``python -m icd_lite edit | invert | generate`` on the toy world.

Every command loads the shipped student pair of the toy world (``--steps 4``: recipe "G", the
full method; ``--steps 3``: recipe "G3"), makes one call of the library and writes files:

* ``edit``: iCD editing with Prompt-to-Prompt (``editing.icd_edit``), about 8 NFE;
* ``invert``: encode an image to noise x_999 with the forward student (``ICDPipeline.encode``)
  and save it as safetensors; optionally decode it back, unguided, to check the inversion;
* ``generate``: images from a prompt (``ICDPipeline.generate``).

Images are read with PIL. The toy world only knows 32x32 RGB pictures, so any other mode is
converted to RGB and any other size resized to 32x32, each with a warning on stderr. PNGs are
written as 32x32 RGB uint8, pixel = round((x + 1) * 127.5) for x in [-1, 1]; ``--scale K``
enlarges them by nearest neighbour, for viewing only. Nothing is ever written over the input
image. Each command prints one line: the network evaluations (NFE), the seconds of the library
call (model loading not included) and the files written. Errors of use (a file that cannot be
read, a word the toy world does not know, prompts that cannot be aligned, a ``--device`` this
machine lacks) print one paragraph on stderr and exit with status 2, no traceback.

``--device`` (default auto: CUDA when available, else the CPU) picks where the models run. The
seeded noise is drawn on the CPU either way, so a seed gives the same picture on both, within
float tolerance.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from .attention import controlled_steps
from .device import add_device_arguments, configure_threads, resolve_device
from .pipeline import load_pipeline
from .editing import P2PSettings, icd_edit
from .metrics import psnr
from .world.checkpoints import CheckpointError
from .world.scenes import caption_problem
from .world.text import build_tokenizer, check_prompt

PROG = "python -m icd_lite"
RECIPE_FOR_STEPS = {4: "G", 3: "G3"}

EPILOG = """\
Only the toy world is supported here: the commands load its shipped weights (no download).
Stable Diffusion 1.5 is used through the Python API, with students you distil yourself (no SD1.5
students ship): load_components("sd15") -> ICDPipeline(...) -> icd_lite.editing.icd_edit(...)
Run `python -m icd_lite <command> --help` for the options of each command."""


class UsageError(ValueError):
    """A command line that cannot be carried out (bad file, output over the input, ...)."""


# -- reading and writing images ----------------------------------------------------------------
def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def open_rgb(path: Path) -> Image.Image:
    """Read an image file with PIL; another mode than RGB is converted, with a warning."""
    try:
        with Image.open(path) as file:
            image = file.copy()  # copy() decodes the pixels, so a broken file fails here
    except OSError as error:  # missing, a directory, not an image, truncated...
        raise UsageError(f"cannot read the image {path}: {error}") from None
    if image.mode != "RGB":
        warn(f"{path} has mode {image.mode}; converted it to RGB "
             f"(any alpha channel or transparency is dropped)")
        image = image.convert("RGB")
    return image


def to_tensor(image: Image.Image, size: int, path: Path) -> torch.Tensor:
    """An RGB PIL image -> [1, 3, size, size] in [-1, 1], resized (with a warning) if needed."""
    if image.size != (size, size):
        warn(f"{path} is {image.width}x{image.height}; resized it to {size}x{size}, the toy "
             f"world's image size (Lanczos filter, aspect ratio not kept)")
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    return (pixels / 127.5 - 1).permute(2, 0, 1)[None]


def save_png(image: torch.Tensor, path: Path, scale: int = 1) -> None:
    """One [3, H, W] image in [-1, 1] -> RGB uint8 PNG, enlarged scale times (nearest)."""
    pixels = ((image.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())  # uint8 [H, W, 3]: RGB
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale),
                                 Image.Resampling.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")


# -- checks made before any work -----------------------------------------------------------------
def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (links included, or, if absent, the same path)."""
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def check_outputs(image: Path | None, outputs: list[tuple[str, Path | None, str]]) -> None:
    """Each output (option, path, suffix) has its suffix, is not the input image and is not
    another output; options that were not given (path None) are skipped."""
    checked = []
    for option, path, suffix in outputs:
        if path is None:
            continue
        if path.suffix.lower() != suffix:
            raise UsageError(f"{option} {path}: the file name must end in {suffix}")
        if image is not None and same_file(path, image):
            raise UsageError(f"{option} {path} is the input image; choose another file name, "
                             f"the input is never overwritten")
        for other_option, other in checked:
            if same_file(path, other):
                raise UsageError(f"{other_option} and {option} name the same file {path}")
        checked.append((option, path))


def checked_prompts(*prompts: str) -> list[str]:
    """Prompts in the toy world's form (lower case, words only); unknown words are an error,
    and a prompt that is no caption of the world gets a warning (its image will not follow it)."""
    tokenizer = build_tokenizer()
    checked = [check_prompt(prompt, tokenizer) for prompt in prompts]
    for prompt in checked:
        problem = caption_problem(prompt)
        if problem is not None:
            warn(f"{prompt!r} is no caption of the toy world ({problem}); its teacher never "
                 f"saw such a scene, so the image will likely not follow the prompt")
    return checked


def blend_words(words: list[str] | None, source: str, target: str):
    """``[(source words, target words)]`` for ``icd_edit``: each blend word is used for the
    prompts that contain it; None when no --blend was given."""
    if not words:
        return None
    words = [word.lower() for word in words]
    kept = tuple(tuple(w for w in words if w in prompt.split()) for prompt in (source, target))
    if not any(kept):
        raise UsageError(f"none of the --blend words {words} is in the source prompt {source!r} "
                         f"or the target prompt {target!r}; give the edited object's noun")
    return [kept]


# -- the commands ------------------------------------------------------------------------------
def run_edit(args) -> None:
    check_outputs(args.image, [("--out", args.out, ".png"),
                               ("--reconstruction", args.reconstruction, ".png")])
    source, target = checked_prompts(args.source, args.target)
    words = blend_words(args.blend, source, target)
    picture = open_rgb(args.image)
    pipeline = load_pipeline(RECIPE_FOR_STEPS[args.steps], device=args.device)
    image = to_tensor(picture, pipeline.base.image_size, args.image).to(pipeline.device)
    p2p = P2PSettings(cross_fraction=args.cross, self_fraction=args.self_fraction,
                      amplify=args.amplify)
    edit = icd_edit(pipeline, image, source, target, w=args.w, tau=args.tau, p2p=p2p,
                    blend_words=words, seed=args.seed)
    save_png(edit.images[0], args.out, args.scale)
    written = str(args.out)
    if args.reconstruction is not None:
        save_png(edit.reconstructions[0], args.reconstruction, args.scale)
        written += f" (reconstruction {args.reconstruction})"
    steps = pipeline.boundaries.m
    print(f"edit: NFE {edit.nfe}, {edit.seconds:.2f} s, wrote {written}; P2P controlled "
          f"cross-attention on {controlled_steps(args.cross, steps)} and self-attention on "
          f"{controlled_steps(args.self_fraction, steps)} of {steps} steps")


def run_invert(args) -> None:
    check_outputs(args.image, [("--out", args.out, ".safetensors"),
                               ("--reconstruction", args.reconstruction, ".png")])
    (prompt,) = checked_prompts(args.prompt)
    picture = open_rgb(args.image)
    recipe = RECIPE_FOR_STEPS[args.steps]
    pipeline = load_pipeline(recipe, device=args.device)
    image = to_tensor(picture, pipeline.base.image_size, args.image).to(pipeline.device)
    encoded = pipeline.encode(image, prompt, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"noise": encoded.latents.cpu().contiguous()}, str(args.out),
              metadata={"prompt": prompt, "recipe": recipe, "seed": str(args.seed)})
    line = f"invert: NFE {encoded.nfe}, {encoded.seconds:.2f} s, wrote {args.out}"
    if args.reconstruction is not None:
        decoded = pipeline.decode(encoded.latents, prompt)  # unguided, w = 1
        save_png(decoded.images[0], args.reconstruction, args.scale)
        quality = psnr(decoded.images, image).item()
        line += (f"; reconstruction: NFE {decoded.nfe}, {decoded.seconds:.2f} s, "
                 f"PSNR {quality:.2f} dB, wrote {args.reconstruction}")
    print(line)


def numbered(path: Path, count: int) -> list[Path]:
    """out.png for one image; out_0.png, out_1.png, ... for several."""
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def run_generate(args) -> None:
    check_outputs(None, [("--out", args.out, ".png")])
    (prompt,) = checked_prompts(args.prompt)
    pipeline = load_pipeline(RECIPE_FOR_STEPS[args.steps], device=args.device)
    output = pipeline.generate(prompt, w=args.w, tau=args.tau, seed=args.seed,
                               num_images=args.num_images)
    paths = numbered(args.out, args.num_images)
    for image, path in zip(output.images, paths):
        save_png(image, path, args.scale)
    print(f"generate: NFE {output.nfe} per image, {output.seconds:.2f} s, "
          f"wrote {', '.join(map(str, paths))}")


# -- the parser --------------------------------------------------------------------------------
def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def guidance_scale(text: str) -> float:
    value = float(text)
    if value < 1.0:
        raise argparse.ArgumentTypeError(f"the classical scale must be >= 1 (1 = unguided), "
                                         f"got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_common_options(parser: argparse.ArgumentParser, seed_help: str) -> None:
    parser.add_argument("--steps", type=int, choices=sorted(RECIPE_FOR_STEPS), default=4,
                        help="steps of each student: 4 loads the shipped pair 'G' (fCD4 + L_f / "
                             "CD4 + L_r, the paper's full method), 3 loads 'G3' (Table 5) "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default: %(default)s)")
    add_device_arguments(parser, threads=1,
                         threads_help="CPU threads for torch, ignored on a GPU; the toy tensors "
                                      "are tiny, so one is fastest, and far faster when other "
                                      "programs keep the cores busy")
    parser.add_argument("--scale", type=positive_int, default=1, metavar="K",
                        help="enlarge every saved PNG K times by nearest neighbour, for viewing "
                             "only (a larger PNG is resized back to 32x32 when read again) "
                             "(default: %(default)s)")


def add_guidance_options(parser: argparse.ArgumentParser, w: float, w_help: str) -> None:
    parser.add_argument("--w", type=guidance_scale, default=w,
                        help=f"classical guidance scale, 1 = unguided (w_code = w - 1); {w_help} "
                             f"(default: %(default)s)")
    parser.add_argument("--tau", type=fraction, default=0.8,
                        help="dynamic CFG threshold: guidance only on the steps with t / T <= "
                             "tau, 1 = guidance on every step; the paper's dynamic CFG "
                             "(default: %(default)s)")


ENCODE_SEED = "seeds the noise that the forward student adds to the image latent before encoding"


def edit_parser(commands) -> None:
    parser = commands.add_parser(
        "edit", help="edit an image with a target prompt (iCD + Prompt-to-Prompt)",
        description="Encode the image with the source prompt (forward student, unguided), then "
                    "decode twice in one batch: the source branch (unguided) reconstructs the "
                    "image, the target branch follows the target prompt under dynamic CFG, and "
                    "Prompt-to-Prompt lends it the source branch's attention maps.",
        epilog="example: python -m icd_lite edit --image in.png --source \"a large green "
               "square on a white background\" --target \"a large purple square on a white "
               "background\" --blend square --out out.png")
    parser.add_argument("--image", type=Path, required=True, help="the image to edit (any "
                        "format PIL reads; converted to 32x32 RGB with a warning if needed)")
    parser.add_argument("--source", required=True, help="a prompt that describes the image, "
                        "in the toy world's words")
    parser.add_argument("--target", required=True, help="the same prompt with the edit made, "
                        "e.g. one word changed")
    parser.add_argument("--out", type=Path, required=True, help="the edited image (.png)")
    parser.add_argument("--reconstruction", type=Path, help="also save the source branch's "
                        "reconstruction of the image (.png)")
    add_guidance_options(parser, 4.0, "the authors' SD1.5 benchmark scripts use 20; the toy "
                                      "students edit best near 4 on ToyBench")
    parser.add_argument("--cross", type=fraction, default=0.3,
                        help="P2P cross-attention injection: the fraction of the decoding "
                             "steps on which the target branch takes the source's word maps, "
                             "rounded down as P2P does (0.3 of 4 steps = 1 step, of 3 steps = "
                             "none; the printed line says how many) (default: %(default)s)")
    parser.add_argument("--self", dest="self_fraction", type=fraction, default=0.6,
                        help="P2P self-attention injection: the fraction of the decoding steps "
                             "on which the target branch takes the source's self-attention "
                             "(default: %(default)s)")
    parser.add_argument("--amplify", type=positive_float, default=4.0,
                        help="P2P reweighting: factor on the cross-attention of the target's "
                             "changed words, 1 = none; it acts on the --cross steps only "
                             "(default: %(default)s)")
    parser.add_argument("--blend", nargs="+", metavar="WORD",
                        help="P2P local blend: the edited object's noun, e.g. '--blend circle' "
                             "(or '--blend circle square' for a shape change); only the region "
                             "these words attend to may change. Each word is used for the "
                             "prompts that contain it; it is an error if neither prompt has one "
                             "(default: no blend, the whole image may change)")
    add_common_options(parser, ENCODE_SEED)
    parser.set_defaults(run=run_edit)


def invert_parser(commands) -> None:
    parser = commands.add_parser(
        "invert", help="encode an image to noise x_999 (the forward student)",
        description="Encode the image with the forward student (unguided) and save the noise "
                    "x_999, shape [1, 4, 8, 8], as safetensors: key 'noise', metadata prompt, "
                    "recipe and seed. With --reconstruction, also decode it back with the "
                    "reverse student, unguided, and print the PSNR against the input.")
    parser.add_argument("--image", type=Path, required=True, help="the image to invert (any "
                        "format PIL reads; converted to 32x32 RGB with a warning if needed)")
    parser.add_argument("--prompt", required=True, help="a prompt that describes the image")
    parser.add_argument("--out", type=Path, required=True, help="the noise (.safetensors)")
    parser.add_argument("--reconstruction", type=Path, help="also decode the noise, unguided, "
                        "and save the image (.png)")
    add_common_options(parser, ENCODE_SEED)
    parser.set_defaults(run=run_invert)


def generate_parser(commands) -> None:
    parser = commands.add_parser(
        "generate", help="generate images from a prompt (the reverse student)",
        description="Decode seeded Gaussian noise with the reverse student under dynamic CFG.")
    parser.add_argument("--prompt", required=True, help="what to draw, in the toy world's words")
    parser.add_argument("--out", type=Path, required=True,
                        help="the image (.png); with --num-images N > 1, the files are named "
                             "out_0.png, out_1.png, ... after it")
    parser.add_argument("--num-images", type=positive_int, default=1, metavar="N",
                        help="how many images, from one batch of noise (default: %(default)s)")
    add_guidance_options(parser, 4.0, "the paper generates with 8; the shipped toy students "
                                      "generate best near 4 (shape / colour / background "
                                      "accuracy 38 / 91 / 89 %% at w = 4 against 30 / 88 / 84 %% "
                                      "at w = 8, 200 prompts)")
    add_common_options(parser, "seeds the initial noise")
    parser.set_defaults(run=run_generate)


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n")[0].replace("``", "")
    parser = argparse.ArgumentParser(prog=PROG, description=description, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in (edit_parser, invert_parser, generate_parser):
        add(commands)
    return parser


def main(argv=None) -> int:
    """Run one command; return 0, or 2 after printing an error of use on stderr."""
    args = build_parser().parse_args(argv)
    try:
        try:
            args.device = resolve_device(args.device)
        except ValueError as error:
            raise UsageError(f"--device {args.device}: {error}") from None
        configure_threads(args.device, args.threads)
        args.run(args)
    except (ValueError, OSError, CheckpointError) as error:
        # ValueError covers UsageError, UnknownWordError and AlignmentError
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
