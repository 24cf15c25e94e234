"""Does a loaded SD checkpoint fit the config's prediction type and noise schedule?

`checkpoint_warnings` says what a file honestly shows (LatentDiffusion.check_checkpoint warns
with it when --actual_resume is loaded); it never fails a run.
"""
from __future__ import annotations

from typing import Mapping

import torch

_CONTEXT_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # [320, context]
_IN_CONV_KEY = "model.diffusion_model.input_blocks.0.0.weight"  # [320, in_channels, 3, 3]
_V_PROBE_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"  # [320]
_V_PROBE_STD = 0.09


def checkpoint_warnings(state_dict: Mapping[str, torch.Tensor], parameterization: str, *,
                        image_size: int | None = None, zero_terminal_snr: bool = False,
                        source: str = "checkpoint") -> list[str]:
    """What a Stable Diffusion file honestly shows about its prediction type and schedule, where it
    disagrees with the config: a list of messages (empty when nothing is known to disagree).

    A file does not record what its UNet predicts, and SD 2.x's 768-v and 512 base UNets have the
    same tensors, so only these are checked:
      * a `v_pred` key (the marker v-prediction fine-tunes carry for ComfyUI) with eps;
      * SD 1.x (cross-attention context 768) with v: the released SD 1.x models all predict eps;
      * SD 2.x (context 1024) with 5 or 9 input channels (depth, inpainting) with v: they predict eps;
      * SD 2.x with 4 input channels: ComfyUI's weight statistic, by which it picks the prediction
        type of SD 2.x files (std of output_blocks.11's first norm1.bias > 0.09: v), disagreeing
        with the config; and eps at image_size >= 96 (768 px), where Stability's models predict v;
      * a zero-terminal-SNR file (alphas_cumprod ending at 0, or a `ztsnr` marker) without
        zero_terminal_snr: training uses the config's schedule.
    Other files (the tiny test model, other architectures) get no messages.
    """
    found = []
    marked_v = "v_pred" in state_dict
    if marked_v and parameterization != "v":
        found.append(f"{source}: the file carries a 'v_pred' key, which v-prediction fine-tunes write, but "
                     f"model.params.parameterization is {parameterization}; set parameterization: v")
    context = state_dict.get(_CONTEXT_KEY)
    context_dim = context.shape[1] if context is not None and context.ndim == 2 else None
    conv = state_dict.get(_IN_CONV_KEY)
    in_channels = conv.shape[1] if conv is not None and conv.ndim == 4 else None
    if context_dim == 768 and parameterization == "v" and not marked_v:
        found.append(f"{source}: an SD 1.x checkpoint (768-wide text context) with model.params.parameterization: "
                     f"v. The released SD 1.x models predict eps; keep v only if this file is a v-prediction "
                     f"fine-tune (its publisher says so), otherwise set parameterization: eps")
    if context_dim == 1024 and in_channels not in (None, 4) and parameterization == "v":
        found.append(f"{source}: an SD 2.x UNet with {in_channels} input channels (depth or inpainting model) with "
                     f"model.params.parameterization: v; these models predict eps")
    if context_dim == 1024 and in_channels == 4 and not marked_v:
        probe = state_dict.get(_V_PROBE_KEY)
        std = probe.float().std(correction=0).item() if probe is not None and probe.numel() > 1 else None
        looks = None if std is None else "v" if std > _V_PROBE_STD else "eps"
        test = f"ComfyUI's weight test (std of {_V_PROBE_KEY} = {std:.3f}, v above {_V_PROBE_STD})" if looks else ""
        if parameterization == "eps" and looks == "v":
            found.append(f"{source}: an SD 2.x checkpoint that {test} reads as v-prediction (Stability's 768-v "
                         f"models), but model.params.parameterization is eps; set parameterization: v "
                         f"(configs/stable-diffusion/v2-inference-v.yaml) unless you know this file predicts eps")
        elif parameterization == "eps" and image_size and image_size >= 96:
            found.append(f"{source}: an SD 2.x checkpoint with model.params.parameterization: eps at image_size "
                         f"{image_size} ({8 * image_size} px). "
                         f"Stability's 768 px SD 2.x models predict v (only the 512 px base predicts eps), and "
                         f"the two have the same tensors" + (f"; {test} reads this one as eps" if test else "")
                         + ". Set parameterization: v if this is a 768-v model")
        if parameterization == "v" and looks == "eps":
            found.append(f"{source}: an SD 2.x checkpoint that {test} reads as eps-prediction (the 512 px base "
                         f"models), but model.params.parameterization is v; set parameterization: eps "
                         f"(configs/stable-diffusion/v2-inference.yaml) unless you know this file predicts v")
    abar = state_dict.get("alphas_cumprod")
    if not zero_terminal_snr and ("ztsnr" in state_dict or (abar is not None and abar.numel() and abar[-1] == 0)):
        found.append(f"{source}: the file was trained with a zero-terminal-SNR schedule, but "
                     f"model.params.zero_terminal_snr is false: training uses the config's schedule, not the "
                     f"file's; set zero_terminal_snr: true to keep training with zero terminal SNR")
    return found
