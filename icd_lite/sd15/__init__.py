"""Stable Diffusion 1.5 scale: loading iCD checkpoints, metrics and experiments at full size.

* ``loading``   - ``load_sd15_pipeline``: base SD1.5, CFG-distilled teacher, a release's LoRAs
                  (checked, alpha 8 supplied, fused or as peft adapters); ``RELEASES``; pairs
                  you distilled with a real-CFG teacher through ``cond_proj=``
* ``pipeline``  - ``SD15Pipeline``: an ``ICDPipeline`` whose ``base`` carries plain SD1.5's UNet
                  for the DDIM / NPI / NTI baselines
* ``fabricate`` - ``python -m icd_lite.sd15.fabricate OUT --size tiny|full``: SD1.5's layout
                  with random weights, release-layout LoRA files and a CLIP BPE tokenizer
* ``bench``     - ``python -m icd_lite.sd15.bench --model DIR``: seconds and memory per edit
* ``metrics``, ``data``, ``train`` - the paper's metrics, data and iCD training at this scale

Quick start (a GPU and the hub; float16 on CUDA)::

    import icd_lite
    pipe = icd_lite.load_sd15_pipeline("4step-v1", device="auto")
    edit = icd_lite.editing.icd_edit(pipe, images, "a cat", "a tiger", w=20.0, tau=0.8)

The names below load on first use, so that ``import icd_lite.sd15.metrics`` stays light.
"""

_LAZY = {"load_sd15_pipeline": "loading", "load_teacher": "loading", "read_lora": "loading",
         "boundaries_from_names": "loading", "LoRAFileError": "loading",
         "read_cond_proj": "loading", "Release": "loading",
         "RELEASES": "loading", "LORA_ALPHA": "loading", "LORA_RANK": "loading",
         "SD15Pipeline": "pipeline", "AdapterView": "pipeline",
         "fabricate_model": "fabricate", "fabricated_sources": "fabricate"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'icd_lite.sd15' has no attribute {name!r}")
