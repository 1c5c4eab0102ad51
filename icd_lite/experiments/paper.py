"""The paper's numbers, in one place, so that every notebook, figure and report quotes them from
code instead of typing them (Starodubcev et al., NeurIPS 2024, arXiv 2406.14539, SD1.5 unless
said). Each constant names its table or figure; the values are those of ``docs/method.md``
section 7. Guidance is in the classical unit w (8 = the paper's "w = 8").

These are targets measured on Stable Diffusion 1.5 with 5k COCO images; the toy world reproduces
their *shape* (which configuration wins, by how much relatively), not their values.
"""

from __future__ import annotations

# Table 1: FID-5k of generated images. Rows: decoding strategy; columns: encoding strategy.
# "d.CFG .6" is dynamic CFG with tau = 0.6. Last row: the NLL of the encoded latents under N(0, I).
TABLE1_ENCODINGS = ("no CFG", "d.CFG .6", "d.CFG .8", "CFG")
TABLE1_FID = {
    "no CFG": {"no CFG": 11.0, "d.CFG .6": 36.6, "d.CFG .8": 63.4, "CFG": 100.5},
    "d.CFG .6": {"no CFG": 11.4, "d.CFG .6": 23.5, "d.CFG .8": 67.8, "CFG": 102.6},
    "d.CFG .8": {"no CFG": 15.0, "d.CFG .6": 14.6, "d.CFG .8": 52.2, "CFG": 108.5},
    "CFG": {"no CFG": 19.0, "d.CFG .6": 19.2, "d.CFG .8": 19.0, "CFG": 102.1},
}
TABLE1_LATENT_NLL = {"no CFG": 1.401, "d.CFG .6": 1.409, "d.CFG .8": 1.415, "CFG": 1.428}

# Table 2: inversion (reconstruction) of 5k COCO images: LPIPS (down), DinoV2 (up), PSNR dB (up).
# Keys: the recipe letters of icd_lite.distill.RECIPES, "DDIM50" for fDDIM50 / DDIM50; w = 1 rows
# first, then w = 8 ("+ d.CFG": dynamic CFG, tau = 0.8; H-K are C/F/G at w = 8).
TABLE2 = {
    ("DDIM50", 1): {"lpips": 0.167, "dino": 0.834, "psnr": 22.98},
    ("A", 1): {"lpips": 0.332, "dino": 0.632, "psnr": 17.75},
    ("B", 1): {"lpips": 0.317, "dino": 0.649, "psnr": 18.42},
    ("C", 1): {"lpips": 0.276, "dino": 0.715, "psnr": 19.19},
    ("E", 1): {"lpips": 0.484, "dino": 0.554, "psnr": 16.40},
    ("F", 1): {"lpips": 0.248, "dino": 0.728, "psnr": 20.01},
    ("G", 1): {"lpips": 0.198, "dino": 0.837, "psnr": 22.27},
    ("DDIM50", 8): {"lpips": 0.479, "dino": 0.534, "psnr": 14.12},
    ("DDIM50 + d.CFG", 8): {"lpips": 0.279, "dino": 0.726, "psnr": 19.58},
    ("C", 8): {"lpips": 0.476, "dino": 0.550, "psnr": 13.87},            # row H
    ("C + d.CFG", 8): {"lpips": 0.370, "dino": 0.650, "psnr": 16.72},    # row I
    ("F + d.CFG", 8): {"lpips": 0.317, "dino": 0.698, "psnr": 17.98},    # row J
    ("G + d.CFG", 8): {"lpips": 0.273, "dino": 0.749, "psnr": 19.66},    # row K
}

# Table 4: generation at w = 8 on 5k COCO prompts: FID (down), CLIP score (up), ImageReward (up).
TABLE4 = {
    "DDIM50": {"fid": 18.73, "clip": 0.266, "image_reward": 0.201},
    "CD4": {"fid": 18.45, "clip": 0.259, "image_reward": 0.044},
    "CD3": {"fid": 17.96, "clip": 0.258, "image_reward": -0.009},
    "CD4 + d.CFG .8": {"fid": 16.25, "clip": 0.254, "image_reward": -0.193},
    "CD4 + d.CFG .7": {"fid": 16.38, "clip": 0.253, "image_reward": -0.217},
    "CD3 + d.CFG .7": {"fid": 17.66, "clip": 0.251, "image_reward": -0.351},
}

# Table 5: 3 against 4 steps, both pairs trained with L_f and L_r (LPIPS, DinoV2, PSNR dB).
TABLE5 = {
    ("fCD4 / CD4", 1): {"lpips": 0.198, "dino": 0.837, "psnr": 22.27},
    ("fCD3 / CD3", 1): {"lpips": 0.192, "dino": 0.841, "psnr": 22.21},
    ("fCD4 / CD4", 8): {"lpips": 0.273, "dino": 0.749, "psnr": 19.66},
    ("fCD3 / CD3", 8): {"lpips": 0.263, "dino": 0.770, "psnr": 19.76},
}

# Table 6: seconds to invert one image (A100), and the NFE of each method.
TABLE6_SECONDS = {"iCD": 0.959, "NPI": 9.95, "NTI": 116.4}
TABLE6_RATIO_TO_ICD = {name: seconds / TABLE6_SECONDS["iCD"]
                       for name, seconds in TABLE6_SECONDS.items()}

# Figure 4a: reconstruction MSE of DDIM50 inversion + decoding with w = 8 switched on only for
# t / T below a threshold (read off the plot; MSE of images in [0, 1]).
FIG4A_MSE = {0.0: 0.030, 0.2: 0.031, 0.4: 0.042, 0.6: 0.081, 0.8: 0.18, 1.0: 0.43}

# Figure 9 (right): human preference for iCD 8 steps against each editor, % (COCO, PieBench).
FIG9_PREFERENCE = {"InfEdit 15": (56, 66), "Edit-friendly 50": (69, 63), "NPI 100": (72, 47),
                   "NTI 100": (63, 38), "Edit-friendly 164": (40, 37)}

# --- notebook 05 (editing) -------------------------------------------------------------------
# Network passes (NFE) per edit as the paper labels its editors: iCD "4 + 4 = 8" and "3 + 4,
# around 7" (section 5 / title), the baselines' labels of Fig. 9 (NPI 100, NTI 100 = 50 + 50).
EDIT_NFE = {"iCD 4 steps": 8, "iCD 3 steps": 7, "NPI": 100, "NTI": 100}

# --- notebook 06 (ablations) ---
# Figure 5a: ImageReward against reconstruction MSE over the (tau1, tau2) of dynamic CFG at w = 8:
# "tau1 >= 0.7 is a good trade-off", tau1 = tau2 (the step form) does as well as a ramp, and the
# caption puts the best trade-off at tau1 = tau2 = 0.8 (the tau of Tables 1, 2 and 4).
FIG5_W = 8.0
FIG5_GOOD_TAU1 = 0.7
FIG5_BEST_TAU = 0.8
# The authors' Prompt-to-Prompt settings in their SD1.5 editing scripts (Figs. 9 and 12; method.md
# section 5): cross- and self-attention injection over these fractions of the decoding steps,
# reweighting of the changed words, and the local-blend threshold.
P2P_AUTHORS = {"cross_fraction": 0.3, "self_fraction": 0.6, "amplify": 4.0, "blend_threshold": 0.3}
# The SD1.5 release's distillation budget (method.md section 4): 6000 iterations at global batch
# 512, about 36 h on 8 A100. The toy students' budget is in icd_lite.distill (DEFAULT_BATCH).
DISTILL_ITERATIONS = 6000
DISTILL_BATCH = 512
