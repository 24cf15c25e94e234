"""The optimizer a LatentDiffusion run trains with, and Lightning's hooks around its step. A mixin
of LatentDiffusion (ddpm.py), which provides the weights (`model`, `network`,
`cond_stage_model`), `optimizer_config`, `network_config`, `learning_rate`, `masters`, the
switches and `_graphed` (the UNet's CUDA graphs, ldm.modules.cuda_graphs).

- Which weights train, in groups (`unet`, `text_encoder`) with their learning rates, and the
  checks each optimizer and step switch makes of the trainer.
- Zeroing gradients, in place while CUDA graphs add into them.
- The EMA update after each optimizer step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ldm.modules.cuda_graphs import check_cuda_graphs_trainer
from ldm.modules.regional_compile import check_cudagraphs_trainer
from ldm.optim.low_memory import check_trainer, compile_updates
from ldm.optim.master_weights import check_master_trainer
from ldm.optim.optimizers import build_optimizer, build_scheduler, schedule_steps


class Optimization:
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self._graphed is None or not self._graphed.active:
            optimizer.zero_grad(set_to_none=True)
            return
        # with CUDA graphs the gradients stay the tensors the graphs add into (ldm.modules.cuda_graphs):
        # zeroed in place; an eager step (a new shape's, with cuDNN's trials on) adds into them too.
        # One multi-tensor kernel per few dozen gradients: Optimizer.zero_grad launches one per weight
        # (~690 for SD's UNet, 2 ms of the GPU's 110 per batch-6 step; doc/performance/end-to-end.md)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_zero_(grads)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The step, then the EMA update: here rather than in on_train_batch_end (as CompVis
        did), because checkpoint callbacks run before that hook and would save an EMA one
        update behind the weights; with gradient accumulation, one update per optimizer step."""
        super().optimizer_step(*args, **kwargs)
        if self.use_ema:
            self.model_ema(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = dataclasses.replace(self.optimizer_config, lr=self.learning_rate)
        if self.network_config is not None:
            net = self.network_config
            lr = net.unet_lr or self.learning_rate
            cfg = dataclasses.replace(cfg, lr=lr, text_encoder_lr=net.text_encoder_lr or cfg.text_encoder_lr or lr)
            groups = self.network.param_groups()
        else:
            groups = {"unet": [p for p in self.model.parameters() if p.requires_grad]}
        if self.cond_stage_trainable:
            groups["text_encoder"] = [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        if cfg.fused_backward and self._trainer is not None:
            check_trainer(self.trainer, "model.params.optimizer")
        if cfg.name == "adamw_master" and self._trainer is not None:
            check_master_trainer(self.trainer, "model.params.optimizer")
        if self.cudagraphs and self._trainer is not None:
            check_cudagraphs_trainer(self.trainer)
        if self.cuda_graphs and self._trainer is not None:
            self.cuda_graphs = check_cuda_graphs_trainer(self.trainer, self.cuda_graphs)
        opt = build_optimizer(groups, cfg, self.device.type, key="model.params.optimizer")
        if self.masters is not None:
            opt.use(self.masters)
        if self.compile_blocks:
            compile_updates(opt)  # adamw_bf16's update as one kernel (other optimizers: unchanged)
        # from the data plan: trainer.estimated_stepping_batches would iterate the loader here,
        # forking its workers before on_fit_start fills the latent cache (ldm.optim.optimizers)
        total = schedule_steps(self.trainer) if self._trainer is not None else 1
        scheduler = build_scheduler(opt, cfg, max(int(total), 1), key="model.params.optimizer")
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

