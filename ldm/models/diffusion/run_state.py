"""What a LatentDiffusion run keeps across a checkpoint, and sets up around training. A mixin of
LatentDiffusion (ddpm.py), which provides `network_config`, `network` and the Lightning hooks' context.

- The training noise stream. Timesteps, noise and posterior samples come from one generator on
  the model's device, seeded from the run's seed and rank and saved in every checkpoint, so a
  resumed run draws exactly what the uninterrupted one would have (the global RNG is also
  drawn from by DataLoaders and libraries, and Lightning does not save it).
- What a checkpoint holds of the state dict (all of it, or the adapter alone).
- At train start: optimizer state in its weights' memory layout, and the set-up's objects
  frozen out of Python's garbage collections.
"""
from __future__ import annotations

import gc
from typing import Any, Mapping

import torch

from ldm.optim.optimizers import match_state_layouts


class RunState:
    def on_fit_start(self) -> None:
        seed = torch.initial_seed() + self.global_rank
        self.noise_rng = torch.Generator(device=self.device).manual_seed(seed)
        self.host_rng = torch.Generator().manual_seed(seed)  # reading draws back from a GPU would sync
        self._apply_rng_states()
        if self.network_config is not None:
            self.network.set_generator(self.noise_rng)  # dropout draws: part of the saved stream

    def on_train_start(self) -> None:
        for optimizer in self.trainer.optimizers:  # after a resume restored their state
            match_state_layouts(optimizer)
        # The objects made so far (model, tokenizer vocabulary, loader, loggers) live for the run:
        # out of Python's garbage collections, whose full passes would walk them all mid-step.
        # A run that failed never reached on_train_end: what it froze is released here.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def on_train_end(self) -> None:
        gc.unfreeze()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.noise_rng is not None:
            checkpoint["noise_rng_state"] = self.noise_rng.get_state()
            checkpoint["host_rng_state"] = self.host_rng.get_state()
        checkpoint["state_dict"] = self.saved_state_dict(checkpoint["state_dict"])
        if self.network_config is not None:
            checkpoint["adapter_only"] = True

    def saved_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a training checkpoint keeps of the state dict: all of it, or only the adapter
        weights (`network.*`) in an adapter run, whose frozen base comes from --actual_resume again."""
        if self.network_config is None:
            return state_dict
        return {k: v for k, v in state_dict.items() if k.startswith("network.")}

    def on_load_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        self._pending_rng = {k: checkpoint[k] for k in ("noise_rng_state", "host_rng_state") if k in checkpoint}
        if self.noise_rng is not None:
            self._apply_rng_states()

    def _apply_rng_states(self) -> None:
        for key, generator in (("noise_rng_state", self.noise_rng), ("host_rng_state", self.host_rng)):
            if key in self._pending_rng:
                generator.set_state(self._pending_rng.pop(key))
