r"""Load iCD for Stable Diffusion 1.5 from the authors' released files (or from LoRAs of your own).

What the authors released (``../shared/sd15_facts.md`` sections 1.1-1.4, the official repository
yandex-research/invertible-cd, ``utils/loading.py``):

* a **CFG-distilled teacher**, SD1.5's UNet plus ``time_embedding.cond_proj`` (Linear 512 -> 320,
  no bias, ``time_cond_proj_dim = 512``; its output is added to the 320-wide sinusoidal timestep
  projection): one pass predicts the guided eps for the w it is given as an
  embedding (hub ``dbaranchuk/sd15-cfg-distill-unet``, or the ``sd15_cfg_distill.pt`` state dict);
* per release, a **forward** (encoder, fCD_m) and a **reverse** (decoder, CD_m) LoRA on that
  teacher, as safetensors with peft's key layout
  ``unet.base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``, rank 64 on the 14 layer
  kinds of ``students.SD15_LORA_TARGETS`` (278 modules, 556 tensors), and **no alpha tensors**:
  they were trained with peft's default ``lora_alpha = 8``, so the update is

  .. math:: W' = W + \frac{\alpha}{r} B A = W + \tfrac{8}{64} B A .

  A loader that does not supply alpha = 8 (diffusers' assumes alpha = r, scale 1) silently
  builds another model; here alpha is an argument whose default is 8 and None is refused;
* the boundaries are in the file names: ``forward-19-259-519-779`` encodes 19 -> 259 -> 519 ->
  779 -> 999 (the start of each jump), ``reverse-259-519-779-999`` decodes 999 -> 779 -> 519 ->
  259 -> 0; ``RELEASES`` lists the three releases.

``load_sd15_pipeline`` loads the teacher once, reads and checks both LoRA files (prefix, keys,
rank), adds them with diffusers' ``add_adapter`` + peft's ``set_peft_model_state_dict`` and,
by default, fuses each into its own copy of the teacher (``fuse_lora``): two plain UNets, no
adapter cost per pass. ``fuse=False`` keeps both as switchable peft adapters on one copy:

============================  ===============  ============
SD1.5 full size, float16      fused (default)  adapters
============================  ===============  ============
UNets (base + 2 students)     5.16 GB          3.71 GB
+ VAE and text encoder        5.57 GB          4.12 GB
============================  ===============  ============

(weight bytes counted from the exact architecture, ``bench.weight_bytes``: UNet 859.5 M
parameters, teacher 859.7 M, LoRA 67.3 M each, VAE 83.7 M, text encoder 123.1 M; activations
come on top: measure them with ``python -m icd_lite.sd15.bench`` on a GPU). Adapters save one
UNet copy (1.45 GB) but add two small matrix products to each of the 278 adapted layers in every
pass, and switch adapters on every call (at the tiny fabricated size on a CPU a UNet pass took
340 ms with adapters against 148 ms fused, median of 30 after 3 warm-up; not yet measured on a
GPU); both fit a 16 GB T4 with room to spare, so the fused students are the default.

**Pairs you distilled with a real-CFG teacher** (``python -m icd_lite.sd15.train`` without
``--teacher``) have no CFG-distilled teacher under them: each student is the *plain* SD1.5 UNet
extended with a zero ``time_embedding.cond_proj`` (``students.student_from_teacher``:
``time_cond_proj_dim`` 512 on SD1.5), the reverse one's projection trained and saved in
``cond_proj.safetensors`` (key ``reverse.time_embedding.cond_proj.weight``, [320, 512]), the
forward one's left at zero (it only ever sees w = 0). Load them with ``cond_proj=``::

    load_sd15_pipeline(None, base=SD15, loras=OUT, cond_proj=OUT, rank=None, lora_alpha=8)

``cond_proj`` is the file or the training output folder; ``teacher`` is then not read. A LoRA
folder whose ``icd_lora.json`` lists a ``cond_proj`` file is refused without ``cond_proj=`` (those
LoRAs on the distilled teacher would be another model, silently).

Guidance units, as everywhere in icd_lite: the pipeline and the editors take the *classical* w
(1 = unguided); the students receive ``w_code = w - 1`` through the embedding. The authors'
editing scripts pass 19 in the code's unit, i.e. ``icd_edit(pipe, ..., w=20.0, tau=0.8)``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..components import SD15_MODEL_ID, _load_sd15, sd15_dtype
from ..device import resolve_device
from ..schedule import NUM_TRAIN_TIMESTEPS, Boundaries
from ..students import SD15_LORA_TARGETS
from .pipeline import AdapterView, SD15Pipeline

LORA_REPO = "dbaranchuk/icd-lora-sd15"
TEACHER_REPO = "dbaranchuk/sd15-cfg-distill-unet"
# Revisions of the hub repositories. Not pinned to commit hashes yet: this project's sessions
# have no access to the hub, so no hash could be read and checked. Put the 40-hex commit here.
REVISIONS = {SD15_MODEL_ID: "main", TEACHER_REPO: "main", LORA_REPO: "main"}

LORA_PREFIX = "unet.base_model.model."  # peft's PeftModel names, saved by diffusers as "unet."
LORA_RANK = 64
LORA_ALPHA = 8.0  # peft's default lora_alpha, which the authors' training script kept
TEACHER_COND_DIM = 512  # time_cond_proj_dim of the CFG-distilled teacher
ENCODE_START = 19  # the encoder's first timestep (the clean latent is noised to t = 19)
COND_PROJ_FILE = "cond_proj.safetensors"  # written by icd_lite.sd15.train (real-CFG teacher)
COND_PROJ_KEY = "{role}.time_embedding.cond_proj.weight"  # role: "forward" or "reverse"
LORA_INFO_FILE = "icd_lora.json"  # written by icd_lite.sd15.train beside the LoRA files
ADAPTERS = {"forward": "icd_forward", "reverse": "icd_reverse"}  # "forward" is nn.Module's


class LoRAFileError(ValueError):
    """A LoRA file whose layout, keys, rank or boundaries are not what the loader expects."""


@dataclass(frozen=True)
class Release:
    """A released pair: the timestep each encoding jump and each decoding jump starts from."""

    name: str
    forward: tuple[int, ...]  # 19, b_1, ..., b_{m-1}
    reverse: tuple[int, ...]  # b_1, ..., b_{m-1}, 999

    @property
    def files(self) -> tuple[str, str]:
        """(forward file, reverse file) as named on the hub."""
        return (f"forward-{'-'.join(map(str, self.forward))}.safetensors",
                f"reverse-{'-'.join(map(str, self.reverse))}.safetensors")

    @property
    def boundaries(self) -> Boundaries:
        return boundaries_from_numbers(self.forward, self.reverse)


RELEASES = {
    "4step-v1": Release("4step-v1", (19, 259, 519, 779), (259, 519, 779, 999)),  # SD1.5 paper
    "4step-v2": Release("4step-v2", (19, 249, 499, 699), (249, 499, 699, 999)),  # SDXL paper
    "3step": Release("3step", (19, 339, 699), (339, 699, 999)),
}

_NAME = re.compile(r"(forward|reverse)[-_]((?:\d+[-_])*\d+)(?:\.safetensors)?$")


def parse_lora_name(path) -> tuple[str, tuple[int, ...]]:
    """("forward" | "reverse", the timesteps) from a file name such as
    ``forward-19-259-519-779.safetensors`` or the tarballs' ``iCD-SD15-reverse_259_519_779_999``.

    Raises LoRAFileError when the name carries no boundaries."""
    match = _NAME.search(Path(path).name)
    if match is None:
        raise LoRAFileError(f"cannot read boundaries from the file name {Path(path).name!r}; "
                            f"name it like 'forward-19-259-519-779.safetensors' or pass "
                            f"boundaries=Boundaries(...)")
    return match.group(1), tuple(int(n) for n in re.split(r"[-_]", match.group(2)))


def boundaries_from_numbers(forward: tuple[int, ...], reverse: tuple[int, ...]) -> Boundaries:
    """Boundaries from the numbers of the two file names: the forward file lists 19 and the
    inner boundaries, the reverse file the inner boundaries and 999 (LoRAFileError otherwise)."""
    forward, reverse = tuple(forward), tuple(reverse)
    if forward[0] != ENCODE_START:
        raise LoRAFileError(f"the forward LoRA starts at t = {forward[0]}, but this pipeline "
                            f"encodes from t = {ENCODE_START} (the authors' start); pass a "
                            f"forward LoRA distilled from t = {ENCODE_START}")
    if forward[1:] != reverse[:-1] or reverse[-1] != NUM_TRAIN_TIMESTEPS - 1:
        raise LoRAFileError(f"the forward ({'-'.join(map(str, forward))}) and reverse "
                            f"({'-'.join(map(str, reverse))}) LoRAs have different boundaries; "
                            f"pass the two files of one release")
    return Boundaries(reverse=(0,) + reverse[:-1], forward=reverse)


def boundaries_from_names(forward_path, reverse_path) -> Boundaries:
    """The pair's boundaries, read from both file names and checked against each other."""
    role_f, numbers_f = parse_lora_name(forward_path)
    role_r, numbers_r = parse_lora_name(reverse_path)
    if (role_f, role_r) != ("forward", "reverse"):
        raise LoRAFileError(f"expected a forward and a reverse file, got {Path(forward_path).name}"
                            f" and {Path(reverse_path).name}; pass (forward_file, reverse_file)")
    return boundaries_from_numbers(numbers_f, numbers_r)


def check_release(boundaries: Boundaries, release: str) -> None:
    """LoRAFileError unless ``boundaries`` are those of the named release."""
    expected = RELEASES[release].boundaries
    if boundaries != expected:
        raise LoRAFileError(f"boundaries mismatch: the files encode {list(boundaries.reverse)} / "
                            f"{list(boundaries.forward)} but release {release!r} is "
                            f"{list(expected.reverse)} / {list(expected.forward)}; pass the "
                            f"files of {release!r}, or release=None for LoRAs of your own")


# -- the LoRA files --------------------------------------------------------------------------
def lora_modules(unet: torch.nn.Module, targets=SD15_LORA_TARGETS) -> list[str]:
    """The UNet's module names that peft adapts for ``targets`` (a name equal to a target or
    ending with "." + target, peft's rule): 278 on SD1.5."""
    return [name for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and any(name == t or name.endswith("." + t) for t in targets)]


def read_lora(path, unet: torch.nn.Module, rank: int | None = LORA_RANK,
              targets=SD15_LORA_TARGETS) -> tuple[dict[str, torch.Tensor], int]:
    """Read a released LoRA file and check its layout against ``unet``.

    Returns (state dict with the ``unet.base_model.model.`` prefix removed, i.e. the keys
    ``<module>.lora_A.weight`` that peft's ``set_peft_model_state_dict`` reads; the rank).
    ``rank=None`` reads the rank from the file (a LoRA you distilled). Raises LoRAFileError,
    one line naming the problem and the fix, for: a wrong key prefix (kohya names, diffusers'
    own ``unet.<module>.lora.down``...), alpha tensors (another layout), a missing or an
    unexpected key, a wrong rank.
    """
    from safetensors.torch import load_file

    name = Path(path).name
    state = load_file(str(path))
    alphas = [key for key in state if key.endswith(".alpha")]
    wrong = [key for key in state if not key.startswith(LORA_PREFIX)]
    if wrong or alphas:
        key = (wrong or alphas)[0]
        raise LoRAFileError(f"{name}: wrong key prefix or layout: {key!r}; the released files "
                            f"use peft names '{LORA_PREFIX}<module>.lora_A.weight' with no "
                            f"alpha tensors (convert kohya files back, or pass the release file)")
    state = {key[len(LORA_PREFIX):]: tensor for key, tensor in state.items()}
    expected = {f"{module}.lora_{ab}.weight" for module in lora_modules(unet, targets)
                for ab in "AB"}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing:
        raise LoRAFileError(f"{name}: missing key: {len(missing)} of {len(expected)} LoRA "
                            f"tensors are absent (e.g. {LORA_PREFIX}{missing[0]}); the file was "
                            f"not trained on this UNet's {len(expected) // 2} target layers "
                            f"(targets=SD15_LORA_TARGETS); pass the full release file")
    if unexpected:
        raise LoRAFileError(f"{name}: unexpected key {LORA_PREFIX}{unexpected[0]} (and "
                            f"{len(unexpected) - 1} more): not a LoRA of this UNet's target "
                            f"layers; pass targets=[...] naming the layers it adapts")
    ranks = {key: tensor.shape[0] for key, tensor in state.items() if ".lora_A." in key}
    found = sorted(set(ranks.values()))
    if rank is None and len(found) == 1:
        rank = found[0]
    if found != [rank]:
        key = next(k for k, r in ranks.items() if r != (rank or found[0]))
        raise LoRAFileError(f"{name}: wrong rank: {key} has rank {ranks[key]} (ranks in file: "
                            f"{found}), expected {rank}; the released iCD LoRAs have rank "
                            f"{LORA_RANK}; for a LoRA of your own pass rank=None (read it)")
    return state, rank


def check_alpha(alpha) -> None:
    """LoRAFileError when no alpha is supplied: the files cannot say it."""
    if alpha is None:
        raise LoRAFileError(f"missing alpha: the released files carry no alpha tensors and were "
                            f"trained with lora_alpha = {LORA_ALPHA:g} (scale {LORA_ALPHA:g}/"
                            f"{LORA_RANK}); pass lora_alpha={LORA_ALPHA:g} (or your own LoRA's "
                            f"alpha)")


def add_lora(unet: UNet2DConditionModel, state: dict[str, torch.Tensor], adapter: str,
             rank: int, alpha: float | None = LORA_ALPHA) -> None:
    """Add ``state`` as the peft adapter ``adapter`` of ``unet`` with scale alpha / rank.

    diffusers' ``add_adapter`` injects LoRA layers for exactly the modules the file holds;
    peft's ``set_peft_model_state_dict`` fills them (any key left unfilled is an error)."""
    import warnings

    from peft import LoraConfig, set_peft_model_state_dict

    check_alpha(alpha)
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    with warnings.catch_warnings():  # a second adapter on one UNet is what fuse=False wants
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=modules),
                         adapter_name=adapter)
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
    unfilled = [key for key in result.missing_keys if f".{adapter}." in key]
    if unfilled or result.unexpected_keys:
        raise LoRAFileError(f"adapter {adapter}: {len(unfilled)} LoRA tensors not filled (e.g. "
                            f"{(unfilled or result.unexpected_keys)[0]}); the file does not "
                            f"match the UNet")


def fused_student(teacher: UNet2DConditionModel, state, rank: int, alpha: float,
                  copy_teacher: bool = True) -> UNet2DConditionModel:
    """A plain UNet: (a copy of) the teacher with W + alpha / r B A fused into its weights."""
    unet = copy.deepcopy(teacher) if copy_teacher else teacher
    add_lora(unet, state, "icd", rank, alpha)
    unet.fuse_lora()
    unet.unload_lora()
    return unet


# -- a guidance projection of your own (pairs distilled with a real-CFG teacher) -------------
def read_cond_proj(path, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """{role: weight} of a trained ``time_embedding.cond_proj`` (``icd_lite.sd15.train``).

    ``path``: the ``cond_proj.safetensors`` file or the training output folder holding it.
    ``shape``: the projection's weight shape in the students ([320, 512] on SD1.5: Linear 512 ->
    320, no bias). The file must hold ``reverse.time_embedding.cond_proj.weight`` and may hold
    ``forward.…`` (absent: that student's projection stays zero). Raises FileNotFoundError (no
    such file) and LoRAFileError (a missing, an unexpected key, a wrong shape), one line each."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / COND_PROJ_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no guidance projection at {path}: pass the {COND_PROJ_FILE} "
                                f"that python -m icd_lite.sd15.train wrote (or its folder)")
    state = load_file(str(path))
    keys = {role: COND_PROJ_KEY.format(role=role) for role in ("forward", "reverse")}
    unexpected = sorted(set(state) - set(keys.values()))
    if keys["reverse"] not in state or unexpected:
        what = f"unexpected key {unexpected[0]!r}" if unexpected else f"no {keys['reverse']!r}"
        raise LoRAFileError(f"{path.name}: {what}; a trained projection file holds "
                            f"{keys['reverse']} (and optionally the forward one)")
    for key, weight in state.items():
        if tuple(weight.shape) != tuple(shape):
            raise LoRAFileError(f"{path.name}: {key} has shape {list(weight.shape)}, but this "
                                f"UNet's projection is {list(shape)} (Linear {shape[1]} -> "
                                f"{shape[0]}); pass the projection trained on this base model")
    return {role: state[key] for role, key in keys.items() if key in state}


def projected_unet(base_unet: UNet2DConditionModel, weight: torch.Tensor | None
                   ) -> UNet2DConditionModel:
    """A copy of the plain UNet with a guidance projection (``time_cond_proj_dim`` 512 on SD1.5):
    zero (``students.student_from_teacher``), then ``weight`` copied in if given. Float32."""
    from ..students import student_from_teacher

    unet = student_from_teacher(base_unet).unet
    if weight is not None:
        unet.time_embedding.cond_proj.weight.data.copy_(weight)
    return unet


def cond_proj_shape(base_unet: UNet2DConditionModel) -> tuple[int, int]:
    """The weight shape of the projection ``students.student_from_teacher`` adds to this UNet:
    (width of the sinusoidal timestep projection = first block width, its default
    time_cond_proj_dim = min(512, 2 x that width)) = (320, 512) on SD1.5."""
    width = base_unet.config.block_out_channels[0]
    return (width, min(512, 2 * width))


def check_lora_info(loras, cond_proj) -> None:
    """LoRAFileError when a LoRA folder's ``icd_lora.json`` says the pair was distilled with a
    real-CFG teacher (it lists a cond_proj file) but no ``cond_proj`` was given."""
    import json

    info_path = Path(loras) / LORA_INFO_FILE if not isinstance(loras, (tuple, list)) else None
    if cond_proj is None and info_path is not None and info_path.is_file():
        if "cond_proj" in json.loads(info_path.read_text()).get("files", {}):
            raise LoRAFileError(f"{loras}: these LoRAs were distilled with a real-CFG teacher "
                                f"({LORA_INFO_FILE} lists a trained cond_proj); pass "
                                f"cond_proj={str(loras)!r} and no teacher")


# -- the teacher and the sources -------------------------------------------------------------
def load_teacher(teacher, base=SD15_MODEL_ID, revision: str | None = None,
                 dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The CFG-distilled teacher from a hub id, a diffusers UNet folder, or a ``.pt`` state dict.

    A ``.pt`` is read with ``torch.load(weights_only=True)`` into SD1.5's UNet (config of
    ``base``) with ``time_cond_proj_dim`` read from the state dict (512 for the authors'),
    strictly (the authors' ``utils/loading.py``). ValueError when the UNet has no guidance
    embedding or the state dict does not fit."""
    if str(teacher).endswith(".pt"):
        state = torch.load(teacher, map_location="cpu", weights_only=True)
        if "time_embedding.cond_proj.weight" not in state:
            raise ValueError(f"{teacher}: no time_embedding.cond_proj.weight, so not the "
                             f"CFG-distilled teacher; pass sd15_cfg_distill.pt or the hub id "
                             f"{TEACHER_REPO}")
        config = UNet2DConditionModel.load_config(base, subfolder="unet", revision=revision)
        unet = UNet2DConditionModel.from_config(
            config, time_cond_proj_dim=state["time_embedding.cond_proj.weight"].shape[1])
        try:
            unet.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[1].strip() if "\n" in str(error) else str(error)
            raise ValueError(f"{teacher} does not fit SD1.5's UNet ({first}); pass the "
                             f"authors' sd15_cfg_distill.pt") from None
        unet = unet.to(dtype)
    else:
        unet = UNet2DConditionModel.from_pretrained(teacher, revision=revision, torch_dtype=dtype)
    if unet.config.time_cond_proj_dim is None:
        raise ValueError(f"{teacher} has no guidance embedding (time_cond_proj_dim); pass the "
                         f"CFG-distilled teacher {TEACHER_REPO}, not plain SD1.5")
    return unet.eval().requires_grad_(False)


def lora_files(loras, release: str | None, revision: str | None = None) -> tuple[Path, Path]:
    """(forward file, reverse file) from a hub repository, a folder, or an explicit pair.

    A hub id or a folder gives the release's two file names (a folder may also hold them under
    the tarballs' names, e.g. ``iCD-SD15-forward_19_259_519_779.safetensors``); without a
    release, a folder must hold exactly one forward and one reverse file."""
    if isinstance(loras, (tuple, list)):
        if len(loras) != 2:
            raise ValueError(f"loras must be (forward_file, reverse_file), got {loras!r}")
        return Path(loras[0]), Path(loras[1])
    folder = Path(loras)
    if folder.is_dir():
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            try:
                role, numbers = parse_lora_name(path)
            except LoRAFileError:
                continue
            wanted = None if release is None else RELEASES[release]
            if wanted is None or numbers == getattr(wanted, role):
                found.setdefault(role, []).append(path)
        for role in ("forward", "reverse"):
            if len(found.get(role, [])) != 1:
                what = f"release {release!r}" if release else "one forward and one reverse LoRA"
                raise ValueError(f"{folder}: found {len(found.get(role, []))} {role} files for "
                                 f"{what}; name them like {RELEASES['4step-v1'].files[0]!r} or "
                                 f"pass loras=(forward_file, reverse_file)")
        return found["forward"][0], found["reverse"][0]
    if release is None:
        raise ValueError(f"{loras!r} is not a folder; with a hub repository name a release "
                         f"({', '.join(RELEASES)}), or pass loras=(forward_file, reverse_file)")
    from huggingface_hub import hf_hub_download

    try:
        return tuple(Path(hf_hub_download(str(loras), name, revision=revision))
                     for name in RELEASES[release].files)
    except Exception as error:  # offline, no such repo or file: one line with the way out
        raise OSError(f"could not fetch the {release} LoRAs from {loras!r} ({type(error).__name__})"
                      f": it needs the Hugging Face hub (unset HF_HUB_OFFLINE), or pass a folder"
                      f" holding {' and '.join(RELEASES[release].files)}") from None


# -- the pipeline ----------------------------------------------------------------------------
def load_sd15_pipeline(release: str | None = "4step-v1", base=SD15_MODEL_ID, teacher=None,
                       loras=LORA_REPO, device="auto", dtype: torch.dtype | None = None,
                       revision: str | None = None, fuse: bool = True,
                       lora_alpha: float | None = LORA_ALPHA, rank: int | None = LORA_RANK,
                       boundaries: Boundaries | None = None, targets=SD15_LORA_TARGETS,
                       with_base_unet: bool = True, image_fit: str = "resize",
                       cond_proj=None) -> SD15Pipeline:
    """iCD on Stable Diffusion 1.5: the authors' (or your) students, ready to encode and edit.

    * ``release``: "4step-v1" (the SD1.5 paper's), "4step-v2", "3step" (``RELEASES``), or None
      for LoRAs you distilled (then ``rank=None`` reads their rank, ``boundaries`` comes from
      the names or is given).
    * ``base``: SD1.5 (hub id or local folder): VAE, text encoder, tokenizer and the plain UNet
      of the teacher baselines (``with_base_unet=False`` skips it: 1.72 GB less in float16).
    * ``teacher``: the CFG-distilled UNet: hub id, diffusers folder, or ``.pt`` state dict
      (default None: ``TEACHER_REPO``; not read with ``cond_proj``).
    * ``loras``: hub repository, folder, or ``(forward_file, reverse_file)``.
    * ``cond_proj``: for a pair distilled with a real-CFG teacher (see the module doc): its
      ``cond_proj.safetensors`` or the folder holding it. Both students then start from the
      plain UNet of ``base`` with a zero guidance projection, the file's projection goes into
      the reverse one, then each LoRA is fused. Needs ``fuse=True`` (the two students differ
      beyond their LoRAs) and no ``teacher``.
    * ``device``: "auto" (CUDA when available), "cpu", "cuda"...; ``dtype``: None = float16
      on CUDA, float32 on the CPU (float16 on the CPU is refused).
    * ``revision``: of the hub repositories (default ``REVISIONS``); ``fuse``: fuse the LoRAs
      into two UNet copies (default) or keep them as peft adapters on one (see module doc).
    * ``image_fit``: "resize" (the authors' plain resize to 512x512) or "crop" (centre-crop the
      largest square, then resize) for images of another size; either warns.

    Returns an ``SD15Pipeline`` (an ``ICDPipeline``): ``encode`` / ``decode`` / ``generate`` /
    ``reconstruct`` with classical w (the paper's edit: ``icd_edit(pipe, ..., w=20.0,
    tau=0.8)``, the authors' 19 in the code unit), and ``pipe.base`` for the baselines.
    Raises LoRAFileError (wrong prefix, missing key, wrong rank, missing alpha, boundaries
    mismatch; a projection file with a wrong key or shape), FileNotFoundError (no projection
    file), ValueError (unknown release, float16 on the CPU, ``cond_proj`` with a teacher or
    with ``fuse=False``), OSError (hub unreachable).
    """
    if release is not None and release not in RELEASES:
        raise ValueError(f"unknown release {release!r}; choose one of {', '.join(RELEASES)}, or "
                         f"None for LoRAs of your own")
    check_alpha(lora_alpha)  # before any loading
    if image_fit not in ("resize", "crop"):
        raise ValueError(f"image_fit must be 'resize' or 'crop', got {image_fit!r}")
    if cond_proj is not None and (teacher is not None or not fuse):
        raise ValueError("cond_proj= loads a pair distilled with a real-CFG teacher onto plain "
                         "SD1.5: pass no teacher, and keep fuse=True (the two students differ "
                         "in their projection, so they cannot share one UNet as adapters)")
    check_lora_info(loras, cond_proj)
    device = resolve_device(device)
    dtype = sd15_dtype(device, dtype)

    def revision_of(source):  # the pinned revision of a hub repository, None for local files
        return revision or (REVISIONS.get(source) if isinstance(source, str) else None)

    forward_file, reverse_file = lora_files(loras, release, revision_of(loras))
    boundaries = _pair_boundaries(forward_file, reverse_file, release, boundaries)
    if cond_proj is None:
        components = _load_sd15(base, dtype, revision_of(base), with_unet=with_base_unet)
        teacher = TEACHER_REPO if teacher is None else teacher
        teacher_unet = load_teacher(teacher, base, revision_of(teacher), torch.float32)
        states = [read_lora(path, teacher_unet, rank, targets) for path in (forward_file,
                                                                            reverse_file)]
        # Copied and fused on the device, so the CPU holds one float32 teacher at most (3.4 GB,
        # plus 2.1 GB of float16 base modules: within Colab's 12.7 GB of RAM); the GPU holds two
        # float32 UNets (6.9 GB) until the float16 cast. (Computed from the sizes, not measured.)
        forward_unet, reverse_unet = students(teacher_unet.to(device), states, lora_alpha, fuse)
        base_unet = components.unet
    else:  # a real-CFG pair: the plain UNet is the students' start and the baselines' teacher
        # float32 on the device until the cast below: three UNets, 10.3 GB on SD1.5 (computed)
        components = _load_sd15(base, dtype, revision_of(base), with_unet=False)
        plain = UNet2DConditionModel.from_pretrained(
            str(base), subfolder="unet", revision=revision_of(base), torch_dtype=torch.float32)
        forward_unet, reverse_unet = real_cfg_students(
            plain.to(device), read_cond_proj(cond_proj, cond_proj_shape(plain)),
            (forward_file, reverse_file), lora_alpha, rank, targets)
        base_unet = plain if with_base_unet else None
    pipe = SD15Pipeline(forward_unet, reverse_unet, components.vae, components.text_encoder,
                        components.tokenizer, components.scheduler, boundaries.reverse,
                        boundaries.forward, "sd15", base_unet, release, image_fit)
    for module in (forward_unet, reverse_unet, base_unet, components.vae,
                   components.text_encoder):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
            if module.dtype != dtype:  # the students were fused in float32
                module.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def students(teacher: UNet2DConditionModel, states, alpha: float, fuse: bool = True):
    """(forward UNet, reverse UNet) from the teacher and the two (state dict, rank) pairs: two
    fused copies (the teacher itself becomes the reverse one), or two ``AdapterView``s of the
    teacher holding both LoRAs as peft adapters. Fusing runs in the teacher's float32; the
    authors cast the LoRA to float16 first."""
    if fuse:
        return (fused_student(teacher, *states[0], alpha),
                fused_student(teacher, *states[1], alpha, copy_teacher=False))
    for (state, rank), role in zip(states, ("forward", "reverse")):
        add_lora(teacher, state, ADAPTERS[role], rank, alpha)
    return AdapterView(teacher, ADAPTERS["forward"]), AdapterView(teacher, ADAPTERS["reverse"])


def real_cfg_students(plain: UNet2DConditionModel, projections: dict, files, alpha: float,
                      rank: int | None = LORA_RANK, targets=SD15_LORA_TARGETS):
    """(forward UNet, reverse UNet) of a pair distilled with a real-CFG teacher: per role, a copy
    of the plain UNet with a guidance projection (``projections[role]``, zero when absent), the
    LoRA file ``files[role]`` read against it and fused (float32, on the plain UNet's device)."""
    unets = []
    for role, path in zip(("forward", "reverse"), files):
        unet = projected_unet(plain, projections.get(role))
        state, file_rank = read_lora(path, unet, rank, targets)
        unets.append(fused_student(unet, state, file_rank, alpha, copy_teacher=False))
    return tuple(unets)


def _pair_boundaries(forward_file, reverse_file, release, given) -> Boundaries:
    """Boundaries from the names (checked against the release and against ``given``), or
    ``given`` when the names carry none."""
    try:
        parsed = boundaries_from_names(forward_file, reverse_file)
    except LoRAFileError:
        if given is None or release is not None:
            raise
        return given
    if given is not None and parsed != given:
        raise LoRAFileError(f"boundaries mismatch: the file names say {list(parsed.reverse)} / "
                            f"{list(parsed.forward)}, boundaries= says {list(given.reverse)} / "
                            f"{list(given.forward)}; drop one of them")
    if release is not None:
        check_release(parsed, release)
    return parsed
