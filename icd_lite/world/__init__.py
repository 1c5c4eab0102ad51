"""The toy world: a tiny text-to-image latent diffusion model that icd-lite trains on a CPU.

* ``scenes``      - procedural scenes, captions, exact masks and edits (the data)
* ``text``        - the word-level tokenizer and the CLIP text-encoder config
* ``models``      - CLIP, AutoencoderKL and UNet2DConditionModel, sized for a CPU
* ``train``       - ``python -m icd_lite.world.train`` (``make train``): CLIP -> VAE -> teacher
* ``checkpoints`` - safetensors checkpoints and the sha256 manifest of the shipped weights
* ``loading``     - the shipped weights, verified before they load
"""
