"""Optimizers and learning-rate schedules for fine-tuning (config section `model.params.optimizer`)."""
from ldm.optim.optimizers import OPTIMIZERS, OptimizerConfig, build_optimizer, build_scheduler, import_optional
from ldm.optim.schedules import SCHEDULES, check_schedule, check_text_encoder_stop, make_lr_lambda, make_scheduler

__all__ = [
    "OPTIMIZERS", "OptimizerConfig", "build_optimizer", "build_scheduler", "import_optional",
    "SCHEDULES", "check_schedule", "check_text_encoder_stop", "make_lr_lambda", "make_scheduler",
]
