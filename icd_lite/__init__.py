"""icd-lite: Invertible Consistency Distillation (Starodubcev et al., NeurIPS 2024), readable.

One module per concept, each short enough to read in one sitting:

* ``schedule``    - SD1.5's noise schedule, the 50-step DDIM grid, segment boundaries
* ``solver``      - the DDIM jump, DDIM sampling and DDIM inversion
* ``guidance``    - CFG, dynamic guidance schedules, the guidance embedding
* ``consistency`` - multi-boundary consistency models, multistep encoding and decoding
* ``losses``      - reverse / forward CD, the preservation losses, one iCD training step
* ``toy2d``       - a 2D Gaussian-mixture world with the exact teacher (notebook 01)
* ``world``       - the toy text-to-image world: scenes, tokenizer, CLIP, VAE, teacher UNet
* ``components``  - ``load_components("toy" | "sd15")``: UNet, VAE, text encoder, tokenizer, scheduler
* ``metrics``     - PSNR, LPIPS-like, DinoV2-like, CLIP-T, Frechet distance, attribute accuracy
* ``students``    - UNet students: a teacher copy with a guidance embedding, or LoRA (peft)
* ``distill``     - the iCD training loop, the recipes of the paper's ablations, shipped pairs
* ``pipeline``    - ``ICDPipeline`` (a diffusers pipeline): encode / decode / generate /
                    reconstruct with NFE counts; ``load_pipeline("G")`` loads a shipped pair
* ``device``      - ``resolve_device("auto")``, ``configure_threads``: one device everywhere
* ``baselines``   - DDIM inversion, null-text inversion, negative-prompt inversion
* ``attention``   - Prompt-to-Prompt attention control through diffusers' attention processors
* ``editing``     - iCD editing, prompt-switch editing, DDIM / NPI / NTI + P2P baselines
* ``bench``       - ``python -m icd_lite.bench world | inversion | editing``
* ``cli``         - ``python -m icd_lite edit | invert | generate``
* ``figures``     - the helper that saves every figure with its numbers
* ``experiments`` - the lab bench around the method (read it last): the paper's numbers, claims
                    and verdicts, the world's quality, the inversion experiments, ToyBench and
                    the editing experiments

Quick start (the toy world, on a GPU when there is one)::

    import icd_lite
    pipe = icd_lite.load_pipeline("G", device="auto")
    out = pipe.generate("a large red circle on a blue background", w=8.0, tau=0.8, seed=0)
    out.images, out.nfe, out.seconds        # [1, 3, 32, 32] in [-1, 1], 4 NFE, seconds
"""

from ._versions import check_versions

check_versions()

from .device import configure_threads, resolve_device  # noqa: E402
from .consistency import consistency_fn, decode, encode, sample_consistency  # noqa: E402
from .guidance import (  # noqa: E402
    GuidanceSchedule,
    cfg,
    classical_to_code,
    code_to_classical,
    constant_guidance,
    guidance_embedding,
    guided_model,
    interval_guidance,
    ramp_guidance,
    step_guidance,
)
from .losses import (  # noqa: E402
    ICDConfig,
    forward_cd_loss,
    forward_preservation_loss,
    icd_training_step,
    pseudo_huber,
    reverse_cd_loss,
    reverse_preservation_loss,
)
from .schedule import (  # noqa: E402
    SD15_SCHEDULE,
    Boundaries,
    NoiseSchedule,
    ddim_timesteps,
    default_boundaries,
)
from .solver import (  # noqa: E402
    ddim_jump,
    eps_to_x0,
    inversion_timesteps,
    invert_ddim,
    sample_ddim,
    sampling_timesteps,
    x0_to_eps,
)

__version__ = "0.1.0"

# The pipeline imports diffusers and transformers (seconds): loaded on first use, so that
# `import icd_lite` stays light for the 2D theory of notebook 01.
_LAZY = {"ICDPipeline": "pipeline", "load_pipeline": "pipeline", "load_pipelines": "pipeline",
         "load_components": "components", "load_sd15_pipeline": "sd15.loading"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'icd_lite' has no attribute {name!r}")
