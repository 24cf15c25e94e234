"""LatentDiffusion: Stable Diffusion as a LightningModule.

    image x [B,3,H,W] in [-1,1] --VAE encode--> z_0 = scale_factor * E(x)   [B,4,H/8,W/8]
    caption --text encoder--> c                                              [B,77,D]
    t ~ U{0..T-1},  eps ~ N(0, I),  z_t = sqrt(abar_t) z_0 + sqrt(1-abar_t) eps
    loss = || UNet(z_t, t, c) - target ||^2,   target = eps  (or v for parameterization "v")

The objective's options (noise offset, multi-resolution noise, input perturbation, timestep
range, loss type, min-SNR weighting, zero terminal SNR) are kohya sd-scripts' and are
defined in ldm.models.diffusion.losses; with their defaults the loss is the one above.

Only the UNet trains by default; the text encoder trains when `cond_stage_trainable`
is set; the VAE is always frozen. With a `network` section (ldm.modules.adapters) only
adapter weights train: the UNet, VAE and text encoder are frozen and kept in half
precision, and checkpoints hold the adapter (`network.*`) alone. State-dict names follow the released checkpoints:
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, the schedule
buffers, and `model_ema.*` when EMA is on. The validation loss and the scopes that
validation and sampling run in are in ldm.models.diffusion.evaluation, what a run saves,
restores and sets up around training in ldm.models.diffusion.run_state, the optimizer and the
hooks around its step in ldm.models.diffusion.optimization (mixins).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from ldm.models.diffusion import losses, schedule
from ldm.models.diffusion.checkpoint_check import checkpoint_warnings
from ldm.models.diffusion.evaluation import Evaluation
from ldm.models.diffusion.optimization import Optimization
from ldm.models.diffusion.run_state import RunState
from ldm.modules.adapters.config import NetworkConfig, base_dtype
from ldm.modules.adapters.network import AdapterNetwork
from ldm.modules.cuda_graphs import GraphedUNet, check_cuda_graphs
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.modules.encoders.output_cache import text_encoder_output_cache
from ldm.modules.regional_compile import check_cudagraphs, check_memory_budget, compile_model, whole_unet_pays
from ldm.optim.low_memory import check_channels_last, unet_dtype
from ldm.optim.master_weights import MasterWeights
from ldm.optim.optimizers import OptimizerConfig
from ldm.util import instantiate_from_config


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`, giving the `model.diffusion_model.*` key prefix."""

    def __init__(self, unet_config: Mapping[str, Any]):
        super().__init__()
        self.diffusion_model = instantiate_from_config(unet_config, path="model.params.unet_config")

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(x, t, context=context)


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for .train() on frozen parts: they stay in eval mode."""
    return self


class LatentDiffusion(Evaluation, RunState, Optimization, pl.LightningModule):
    def __init__(
        self,
        unet_config: Mapping[str, Any],
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        linear_start: float = 0.00085,
        linear_end: float = 0.0120,
        parameterization: str = "eps",
        scale_factor: float = 0.18215,
        image_size: int = 64,
        channels: int = 4,
        cond_stage_trainable: bool = False,
        use_ema: bool = False,
        ema_decay: float = 0.9999,
        optimizer: Mapping[str, Any] | None = None,
        network: Mapping[str, Any] | None = None,
        compile: bool | str = False,
        cuda_graphs: bool | str = "auto",
        channels_last: bool = False,
        activation_memory_budget: float = 1.0,
        unet_precision: str = "fp32",
        cache_text_encoder_outputs: bool | None = None,
        # The objective's options (ldm.models.diffusion.losses; kohya sd-scripts' definitions).
        noise_offset: float = 0.0,
        noise_offset_random_strength: bool = False,
        multires_noise_iterations: int = 0,
        multires_noise_discount: float = 0.3,
        ip_noise_gamma: float = 0.0,
        min_snr_gamma: float | None = None,
        zero_terminal_snr: bool = False,
        min_timestep: int = 0,
        max_timestep: int | None = None,
        loss_type: str = "l2",
        huber_c: float = 0.1,
        # Keys the released SD YAMLs carry; they take only the value SD uses.
        conditioning_key: str = "crossattn",
        num_timesteps_cond: int = 1,
        first_stage_key: str = "image",
        cond_stage_key: str = "caption",
        log_every_t: int = 200,
        monitor: str | None = None,
    ):
        super().__init__()
        if parameterization not in ("eps", "v"):
            raise ValueError(f"model.params.parameterization: expected 'eps' or 'v', got {parameterization!r}")
        if conditioning_key != "crossattn":
            raise ValueError(f"model.params.conditioning_key: only 'crossattn' is supported, got {conditioning_key!r}")
        if num_timesteps_cond != 1:
            raise ValueError("model.params.num_timesteps_cond: only 1 is supported")
        self.parameterization = parameterization
        self.scale_factor = scale_factor  # a plain attribute: released checkpoints do not store it
        self.image_size = image_size
        self.channels = channels
        self.cond_stage_trainable = cond_stage_trainable
        self.monitor = monitor
        self.learning_rate = 1.0e-4  # set by the trainer from model.base_learning_rate
        self._loss_smooth: torch.Tensor | None = None
        self.noise_rng: torch.Generator | None = None  # made at fit start; None: the global RNG
        self.host_rng: torch.Generator | None = None   # CPU draws that set shapes (pyramid noise)
        self._pending_rng: dict[str, torch.Tensor] = {}  # saved states, applied when fit starts
        if optimizer is not None and "lr" in optimizer:
            raise ValueError("model.params.optimizer.lr: the learning rate is model.base_learning_rate")
        self.optimizer_config = OptimizerConfig.from_mapping(optimizer, key="model.params.optimizer")

        self.model = DiffusionWrapper(unet_config)
        self.first_stage_model = instantiate_from_config(first_stage_config, path="model.params.first_stage_config")
        self.cond_stage_model = instantiate_from_config(cond_stage_config, path="model.params.cond_stage_config")
        self._freeze(self.first_stage_model)
        if not cond_stage_trainable:
            self._freeze(self.cond_stage_model)
        else:
            self.cond_stage_model.requires_grad_(True)
            self.cond_stage_model.train()

        self.num_timesteps = timesteps
        self.objective = losses.Objective(
            num_timesteps=timesteps, noise_offset=noise_offset,
            noise_offset_random_strength=noise_offset_random_strength,
            multires_noise_iterations=multires_noise_iterations, multires_noise_discount=multires_noise_discount,
            ip_noise_gamma=ip_noise_gamma, min_snr_gamma=min_snr_gamma, zero_terminal_snr=zero_terminal_snr,
            min_timestep=min_timestep, max_timestep=max_timestep, loss_type=loss_type, huber_c=huber_c)
        betas = schedule.make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end)
        if zero_terminal_snr:
            betas = schedule.rescale_zero_terminal_snr(betas)
            if parameterization == "eps":
                rank_zero_warn("model.params.zero_terminal_snr is meant for parameterization: v (Lin et al. 2023): "
                               "at the last step x_t is pure noise, and an eps prediction there says nothing about "
                               "x_0 (x_0 = (x_t - sqrt(1-abar) eps) / sqrt(abar) divides by 0)")
        self._config_betas = betas  # float64 [T]; the schedule buffers may be overwritten by a loaded file
        for name, value in schedule.schedule_buffers(betas).items():
            self.register_buffer(name, value)

        self.use_ema = use_ema
        self.ema_decay = ema_decay
        if use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)

        if not (isinstance(compile, bool) or compile == "reduce-overhead"):
            raise ValueError(f"model.params.compile: expected true, false or reduce-overhead, got {compile!r}")
        self.compile_blocks = bool(compile)
        self.cudagraphs = compile == "reduce-overhead"
        self.memory_budget = check_memory_budget(activation_memory_budget, self.compile_blocks)
        self.unet_dtype = unet_dtype(unet_precision, use_ema, self.optimizer_config.name)
        self.channels_last = check_channels_last(channels_last, self.optimizer_config.name)
        self._compiled = False
        self.masters: MasterWeights | None = None  # setup, with optimizer.name adamw_master
        self.network_config: NetworkConfig | None = None
        if network is not None:
            self._add_network(NetworkConfig.from_mapping(network))
        if self.cudagraphs:
            check_cudagraphs(self.network_config is not None, unet_config, self.optimizer_config.fused_backward)
        text_encoder_trains = cond_stage_trainable or (
            self.network_config is not None and "text_encoder" in self.network_config.targets)
        self.text_cache = text_encoder_output_cache(cache_text_encoder_outputs, text_encoder_trains)
        self.cuda_graphs = check_cuda_graphs(
            cuda_graphs, compile=compile, adapters=self.network_config is not None,
            text_encoder_trains=text_encoder_trains, fused_backward=self.optimizer_config.fused_backward,
            unet_config=unet_config)
        self._graphed: GraphedUNet | None = None  # the first training step on a GPU makes it

    def _add_network(self, cfg: NetworkConfig) -> None:
        """Freeze the base model and wrap its layers with adapters (the only trained weights)."""
        key = "model.params.network"
        if self.use_ema:
            raise ValueError(f"{key}: adapters train without EMA; set model.params.use_ema: false")
        if self.cond_stage_trainable:
            raise ValueError(f"{key}: cond_stage_trainable trains the whole text encoder; with a network the text "
                             f"encoder trains through its adapters (network.targets); set cond_stage_trainable: false")
        self._freeze(self.model)
        weights, source = None, "<weights>"
        if cfg.network_weights:
            from ldm.modules.adapters.files import read_adapter

            weights, _ = read_adapter(cfg.network_weights)
            source = cfg.network_weights
        self.network_config = cfg
        self.network = AdapterNetwork(self, cfg, weights, source)
        self.strict_loading = False  # checkpoints hold the adapter only (on_save_checkpoint)

    def reset_ema(self) -> None:
        """Start the EMA from the current UNet weights (after loading a file without EMA)."""
        if self.use_ema:
            self.model_ema = LitEma(self.model, decay=self.ema_decay).to(self.device)

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        module.eval()
        module.train = _frozen_train.__get__(module)  # keep eval mode under trainer.fit()
        module.requires_grad_(False)

    # ---- encoders ---------------------------------------------------------------
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,3,H,W] in [-1,1] -> z_0 [B,4,H/f,W/f], sampled from the posterior and scaled."""
        return self.scale_factor * self.first_stage_model.encode(x).sample(generator=self.noise_rng)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(z / self.scale_factor)

    def get_learned_conditioning(self, cond: Sequence[str] | torch.Tensor) -> torch.Tensor:
        """Captions (list of str) or token ids [B,77] -> context [B,77,D]."""
        if isinstance(cond, torch.Tensor):
            return self.cond_stage_model.encode_tokens(cond.to(self.device))
        return self.cond_stage_model(list(cond))

    def batch_conditioning(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """A batch's context [B,77,D]: in training, from the kept outputs when the text encoder
        is frozen and has seen every caption (`text_cache`); else from its token ids
        (on_before_batch_transfer made them), else from its captions (a batch that did not come
        through Lightning)."""
        cache = self.text_cache if self.training and "caption" in batch else None
        context = cache.lookup(batch["caption"]) if cache is not None else None
        if context is None:
            context = self.get_learned_conditioning(batch["tokens"] if "tokens" in batch else batch["caption"])
            if cache is not None:  # in the kept rows' dtype: what later, cached steps get
                context = cache.store(batch["caption"], context)
        return context

    # ---- diffusion ----------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return schedule.q_sample(self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, x0, t, noise)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "v":
            return schedule.v_target(self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, x0, t, noise)
        return noise

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs and self.training and x_t.is_cuda:
            if self._graphed is None:
                self._graphed = GraphedUNet(self.model, auto=self.cuda_graphs == "auto")
            return self._graphed(x_t, t, context)  # eager without grad (validation, sampling)
        return self.model(x_t, t, context)

    def p_losses(self, z0: torch.Tensor, context: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor | None = None, input_noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample loss [B] between the prediction and its target (eps or v, made from `noise`):
        `loss_type` averaged over C,H,W, times the min-SNR weight when `min_snr_gamma` is set.
        `input_noise` (default: `noise`) is the noise that makes x_t (input perturbation)."""
        noise = torch.randn_like(z0) if noise is None else noise
        x_t = self.q_sample(z0, t, noise if input_noise is None else input_noise)
        pred = self.apply_model(x_t, t, context)
        obj = self.objective
        loss = losses.per_sample_loss(pred.float(), self.target(z0, t, noise).float(), obj.loss_type, obj.huber_c)
        if obj.min_snr_gamma is not None:
            loss = loss * losses.min_snr_weight(schedule.snr(self.alphas_cumprod, t), obj.min_snr_gamma,
                                                self.parameterization)
        return loss

    def training_noise(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t [B], eps [B,C,H,W], the noise that makes x_t [B,C,H,W]) for a training batch of latents,
        all drawn from the noise stream: t ~ U{min_timestep..max_timestep-1}, eps ~ N(0, I) with
        offset and multi-resolution noise when set, x_t's noise eps (+ ip_noise_gamma * n)."""
        obj, g = self.objective, self.noise_rng
        t = torch.randint(obj.min_timestep, obj.max_timestep, (z0.shape[0],), device=z0.device, generator=g)
        noise = torch.randn(z0.shape, device=z0.device, dtype=z0.dtype, generator=g)
        if obj.noise_offset:
            noise = losses.offset_noise(noise, obj.noise_offset, obj.noise_offset_random_strength, g)
        if obj.multires_noise_iterations:
            noise = losses.pyramid_noise(noise, obj.multires_noise_iterations, obj.multires_noise_discount, g,
                                         ratio_generator=self.host_rng)
        input_noise = losses.perturbed_noise(noise, obj.ip_noise_gamma, g) if obj.ip_noise_gamma else noise
        return t, noise, input_noise

    @torch.no_grad()
    def batch_latents(self, batch: Mapping[str, Any], mode: bool = False) -> torch.Tensor:
        """z_0: `latent`, else a draw (the mean with `mode`) from the posterior of `image` or of the
        cached `moments` [B,2C,h,w] (cache_latents; ldm.data.latent_cache): the same noise draws."""
        if "latent" in batch:
            return batch["latent"]
        if "moments" not in batch:
            posterior = self.first_stage_model.encode(batch["image"].to(self.device))
        else:
            posterior = DiagonalGaussianDistribution(batch["moments"].to(self.device))
        return self.scale_factor * (posterior.mode() if mode else posterior.sample(generator=self.noise_rng))

    def shared_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        z0 = self.batch_latents(batch)
        context = self.batch_conditioning(batch)
        t, noise, input_noise = self.training_noise(z0)
        loss = self.p_losses(z0, context, t, noise, input_noise)  # [B]
        if "loss_weight" in batch:  # regularisation images carry prior_loss_weight
            loss = loss * batch["loss_weight"].to(loss)
        return loss.mean()

    # ---- the schedule of the config; the frozen base in half precision (adapter runs) -----
    def setup(self, stage: str) -> None:
        self._use_config_schedule()
        if self.network_config is not None:
            dtype = base_dtype(self.network_config.base_precision, str(self.trainer.precision))
            for part in (self.model, self.first_stage_model, self.cond_stage_model):
                part.to(dtype)
        elif self.unet_dtype != torch.float32:  # weights stored in bf16 (adamw_bf16 keeps them training)
            if self.optimizer_config.name == "adamw_master" and self.masters is None:
                self.masters = MasterWeights(self.model, self.unet_dtype)  # keeps the fp32 values as masters
            self.model.to(self.unet_dtype)  # and the frozen parts with them: 0.4 GiB of the 6 GiB budget
            self.first_stage_model.to(self.unet_dtype)
            if not self.cond_stage_trainable:
                self.cond_stage_model.to(self.unet_dtype)
        if self.channels_last:  # NHWC conv weights: the convolutions' outputs follow them
            for part in (self.model, self.model_ema) if self.use_ema else (self.model,):
                part.to(memory_format=torch.channels_last)  # the EMA's buffers too: one multi-tensor lerp
        if self.compile_blocks and not self._compiled:  # after the adapters patch the layers
            checkpointing = any(getattr(m, "use_checkpoint", False) for m in self.model.modules())
            whole = whole_unet_pays(self.cudagraphs, self.optimizer_config.fused_backward, checkpointing)
            rank_zero_info(compile_model(self, cudagraphs=self.cudagraphs, whole_unet=whole,
                                         activation_memory_budget=self.memory_budget))
            self._compiled = True

    def _use_config_schedule(self) -> None:
        """Loading a file (--actual_resume) copies its schedule buffers over the config's; train
        on the config's schedule (e.g. zero_terminal_snr on a released model's file)."""
        config = schedule.schedule_buffers(self._config_betas)
        if torch.allclose(self.alphas_cumprod.detach().cpu(), config["alphas_cumprod"], rtol=1e-5, atol=1e-7):
            return
        message = (f"the loaded noise schedule (alphas_cumprod[-1] = {self.alphas_cumprod[-1].item():.3g}) differs "
                   f"from model.params' (alphas_cumprod[-1] = {config['alphas_cumprod'][-1].item():.3g}, "
                   f"zero_terminal_snr: {str(self.objective.zero_terminal_snr).lower()}); training uses model.params'")
        if self.objective.zero_terminal_snr:
            rank_zero_info(message)  # expected: zero terminal SNR on a released model's file
        else:
            rank_zero_warn(message)
        with torch.no_grad():
            for name, value in config.items():
                getattr(self, name).copy_(value)

    def kohya_fields(self) -> dict[str, str]:
        """kohya's header keys for the objective's options (merged into adapter files' headers)."""
        return self.objective.kohya_fields()

    def check_checkpoint(self, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> list[str]:
        """Warn where `state_dict` looks made for another prediction type or schedule than the
        config's (checkpoint_warnings); returns the warnings."""
        found = checkpoint_warnings(state_dict, self.parameterization, image_size=self.image_size,
                                    zero_terminal_snr=self.objective.zero_terminal_snr, source=source)
        for message in found:
            rank_zero_warn(message)
        return found

    # ---- Lightning hooks ---------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Captions become token ids here, on the host, before Lightning moves the batch to the
        device (from pinned memory, without waiting). Tokenizing in the step would copy the ids
        from pageable memory, which waits for all the GPU's queued work, once per step."""
        if isinstance(batch, Mapping) and "caption" in batch and "tokens" not in batch:
            if self.training and self.text_cache is not None and self.text_cache.has_all(batch["caption"]):
                return batch  # the step takes its context from the cache
            tokens = self.cond_stage_model.tokenize(list(batch["caption"]))
            batch = {**batch, "tokens": tokens.pin_memory() if self.device.type == "cuda" else tokens}
        return batch

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the graphs' outputs of the last step are free to reuse
        loss = self.shared_step(batch)
        n = len(batch["caption"])
        with torch.no_grad():  # an exponential moving average on the device: no host sync
            smooth = self._loss_smooth
            self._loss_smooth = loss.detach() if smooth is None else torch.lerp(smooth, loss.detach(), 0.02)
        # not prog_bar: Lightning reads those back every step; the bar reads it when it refreshes
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/loss_smooth", self._loss_smooth, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def on_train_end(self) -> None:
        super().on_train_end()
        if self._graphed is not None:  # the graphs' memory pool back to the allocator
            self._graphed.release()
            self._graphed = None
