"""Sample grids during training, to watch a fine-tune progress.

Every `batch_frequency` optimizer steps and at the end of each epoch (and, with
`log_first_step`, before the first optimizer step of a run from global step 0), rank 0 draws
    batch    images for (up to max_images of) the captions of the latest training batch,
             at that batch's size (its aspect bucket), capped at the training resolution;
    prompts  images for each line of `prompts_file`, re-read every time, so it can be
             edited while the run goes on.
Seeds never change between rounds (per prompt: its --d, else seed + its index), so the
grids of different steps compare image by image. Files, under <logdir>/images/train/:
    samples_gs-000500_e-01_batch.png     grid, rows of up to 4
    samples_gs-000500_e-01_batch.txt     one prompt line per image, in grid order
The grid of step 0 (`log_first_step`) is the base model's: the baseline every later grid
compares to, and sampling's first-use costs (and failures) come before training, as the
sanity check's validation does.
The grids also go to TensorBoard as images `samples/batch`, `samples/prompts`. A writer
thread encodes and writes them (~0.7 s of PNG encoding per 8-image grid) while training goes
on; the end of the run waits for it, and a failed write stops the run at the next grid.

Prompts file: one prompt per line; blank lines and lines starting with `#` are skipped.
Options follow the prompt (the kohya-ss sample-prompt syntax):
    a well-lit photo of a cat --n blurry, lowres --w 512 --h 768 --d 42 --s 30 --l 6.5 --ss ddim
    --n negative prompt   --w / --h width / height in pixels   --d seed   --s steps   --l guidance
    --ss sampler: dpmpp_2m (DPM++ 2M; kohya's dpmsolver++) or ddim
Width and height are rounded down to a multiple of 8 latent pixels (64 px for SD).

Samplers: DDIM (40 steps unless `steps` says otherwise) or DPM-Solver++(2M) (20), for the
logger (`sampler`) or per prompt (`--ss`).

Sampling runs in eval mode, without gradients, with the EMA weights if the model keeps
them, and leaves the module's train/eval flags and the torch CPU/CUDA RNG states exactly
as it found them, so a run with samples trains the same as one without.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from ldm.callbacks.writer import WriterThread
from ldm.models.diffusion.txt2img import SAMPLERS, latent_factor, sampler_name, txt2img

GRID_COLUMNS = 4


# ---- prompts file ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    """A prompt and its options; None means "the ImageLogger's default"."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    sampler: str | None = None

    def to_line(self) -> str:
        """Back to the prompts-file syntax (the .txt beside each grid)."""
        options = [("n", self.negative_prompt), ("w", self.width), ("h", self.height),
                   ("d", self.seed), ("s", self.steps), ("l", self.guidance_scale), ("ss", self.sampler)]
        return " ".join([self.prompt] + [f"--{key} {value}" for key, value in options if value is not None])


# `--x value` where `--x` stands alone: "well-lit" and "a -- b" are prompt text
_OPTION = re.compile(r"(?:^|\s)--(\w+)(?=\s|$)")


def parse_prompt_line(line: str, multiple: int = 64, max_steps: int = 999, where: str = "prompt") -> SamplePrompt:
    """One prompts-file line -> SamplePrompt. Sizes are rounded down to `multiple` pixels;
    `where` (e.g. "prompts.txt:3") starts every error message."""
    text, *pairs = _OPTION.split(line.strip())
    prompt = " ".join(text.split())
    if not prompt:
        raise ValueError(f"{where}: no prompt text before the options in {line.strip()!r}")
    fields: dict[str, Any] = {}
    for key, raw in zip(pairs[0::2], pairs[1::2]):
        value = raw.strip()
        if key not in _PARSERS:
            raise ValueError(f"{where}: unknown option --{key} (known: --n, --w, --h, --d, --s, --l, --ss)")
        name, parse = _PARSERS[key]
        if name in fields:
            raise ValueError(f"{where}: option --{key} given twice")
        try:
            fields[name] = parse(value, multiple, max_steps)
        except ValueError as e:
            raise ValueError(f"{where}: --{key} {value!r}: {e}") from None
    return SamplePrompt(prompt, **fields)


def _whole(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _size(value: str, multiple: int, max_steps: int) -> int:
    px = _whole(value)
    if px < multiple:
        raise ValueError(f"must be at least {multiple} pixels")
    return px // multiple * multiple


def _seed(value: str, multiple: int, max_steps: int) -> int:
    seed = _whole(value)
    if not 0 <= seed < 2**63:
        raise ValueError("expected a seed in [0, 2^63)")
    return seed


def _steps(value: str, multiple: int, max_steps: int) -> int:
    steps = _whole(value)
    if not 1 <= steps <= max_steps:
        raise ValueError(f"expected a number of steps in [1, {max_steps}]")
    return steps


def _guidance(value: str, multiple: int, max_steps: int) -> float:
    try:
        scale = float(value)
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(scale):
        raise ValueError("expected a finite number")
    return scale


_PARSERS = {
    "n": ("negative_prompt", lambda value, multiple, max_steps: " ".join(value.split())),
    "w": ("width", _size),
    "h": ("height", _size),
    "d": ("seed", _seed),
    "s": ("steps", _steps),
    "l": ("guidance_scale", _guidance),
    "ss": ("sampler", lambda value, multiple, max_steps: sampler_name(value)),
}


def read_prompts_file(path: str | Path, multiple: int = 64, max_steps: int = 999) -> list[SamplePrompt]:
    """All prompts of the file; errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"ImageLogger prompts_file {path}: cannot read it ({e})") from None
    return [parse_prompt_line(line, multiple, max_steps, where=f"{path}:{number}")
            for number, line in enumerate(lines, start=1)
            if line.strip() and not line.lstrip().startswith("#")]


# ---- sizes and grids ---------------------------------------------------------------------
def fit_size(height: int, width: int, resolution: int, multiple: int) -> tuple[int, int]:
    """(height, width) scaled down to at most resolution^2 pixels, aspect kept, rounded down to `multiple`."""
    scale = min(1.0, resolution / math.sqrt(height * width))
    return (max(multiple, int(height * scale) // multiple * multiple),
            max(multiple, int(width * scale) // multiple * multiple))


def make_grid(images: Sequence[Image.Image], columns: int = GRID_COLUMNS) -> Image.Image:
    """Images in rows of `columns`, each at the top left of a cell as large as the largest one."""
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    cols = min(columns, len(images))
    grid = Image.new("RGB", (cols * cell_w, math.ceil(len(images) / cols) * cell_h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * cell_w, (i // cols) * cell_h))
    return grid


@contextmanager
def sampling_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """eval(), no_grad, LatentDiffusion.eval_scope (EMA weights), cudnn.benchmark off;
    afterwards every submodule's train flag, the benchmark flag and the torch CPU and CUDA
    RNG states are as they were.

    Benchmark mode is off because sample sizes vary by prompt: benchmarking each new shape
    costs time, and its trial workspaces for the VAE decoder's fp32 convolutions took ~30 GiB
    on an H100-class card (measured: 46 GiB peak in sampling windows vs 17 GiB in training)."""
    modes = [(m, m.training) for m in pl_module.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    benchmark = torch.backends.cudnn.benchmark
    pl_module.eval()
    torch.backends.cudnn.benchmark = False
    try:
        with torch.no_grad(), pl_module.eval_scope():
            yield
    finally:
        torch.backends.cudnn.benchmark = benchmark
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


# ---- the callback ------------------------------------------------------------------------
class ImageLogger(pl.Callback):
    def __init__(self, batch_frequency: int = 250, max_images: int = 8, prompts_file: str | None = None,
                 steps: int | None = None, guidance_scale: float = 7.5, seed: int = 1234,
                 log_on_epoch_end: bool = True, negative_prompt: str = "", sampler: str = "ddim",
                 disabled: bool = False, logdir: str | None = None, log_first_step: bool = False):
        counts = [("batch_frequency", batch_frequency), ("max_images", max_images)]
        for name, value in counts + ([("steps", steps)] if steps is not None else []):  # steps None: the sampler's
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageLogger {name}: expected an integer >= 1, got {value!r}")
        try:
            self.sampler = sampler_name(sampler)
        except ValueError as e:
            raise ValueError(f"ImageLogger sampler: {e}") from None
        self.batch_frequency = batch_frequency
        self.max_images = max_images
        self.prompts_file = Path(prompts_file) if prompts_file else None
        self.steps = steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.log_on_epoch_end = log_on_epoch_end
        self.log_first_step = log_first_step
        self.negative_prompt = negative_prompt
        self.disabled = disabled
        self.logdir = Path(logdir) if logdir else None
        self._captions: list[str] = []
        self._batch_hw: tuple[int, int] | None = None  # pixel size of the latest batch
        self._last_logged_step = -1
        self._writer = WriterThread("sample-grid-writer", "sample grid")

    # -- hooks ------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.disabled and self.prompts_file is not None:
            self._read_prompts(pl_module)  # a broken file stops the run before it starts

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if not self.disabled and self.log_first_step and trainer.global_step == 0:
            self._note_batch(pl_module, batch)  # the first batch's captions and size, before it trains
            self.log_samples(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.disabled:
            return
        self._note_batch(pl_module, batch)
        if trainer.global_step > 0 and trainer.global_step % self.batch_frequency == 0:
            self.log_samples(trainer, pl_module)

    def _note_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        """The batch grid's captions and pixel size: the latest training batch's."""
        self._captions = [" ".join(str(c).split()) for c in batch["caption"][: self.max_images]]
        if "image" in batch:
            self._batch_hw = tuple(batch["image"].shape[-2:])
        elif "latent" in batch or "moments" in batch:  # moments: cached VAE posteriors (cache_latents)
            latent = batch["latent"] if "latent" in batch else batch["moments"]
            self._batch_hw = tuple(s * latent_factor(pl_module) for s in latent.shape[-2:])

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.disabled and self.log_on_epoch_end:
            self.log_samples(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._writer.shutdown()

    def wait(self) -> None:
        """Block until every grid is written; raise the first failure, naming its file."""
        self._writer.collect(wait=True)

    # -- sampling ---------------------------------------------------------------------------
    def log_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the batch and prompts grids for the current step (once per step, rank 0 only)."""
        if not trainer.is_global_zero or trainer.global_step == self._last_logged_step:
            return
        self._writer.collect()
        self._last_logged_step = trainer.global_step
        grids = {}
        if self._captions and self._batch_hw is not None:
            grids["batch"] = self._batch_prompts(trainer, pl_module)
        if self.prompts_file is not None:
            try:
                grids["prompts"] = [self._resolve(p, i, pl_module, trainer)
                                    for i, p in enumerate(self._read_prompts(pl_module))]
            except ValueError as e:  # an edit in progress must not stop the run
                rank_zero_warn(f"{e}; skipping the prompts grid at step {trainer.global_step}")
        with sampling_mode(pl_module):
            for kind, prompts in grids.items():
                if prompts:
                    images = self.generate(pl_module, prompts, trainer)
                    self._save(trainer, kind, make_grid(images), prompts)

    @staticmethod
    def _multiple(pl_module: pl.LightningModule) -> int:
        """Image sides are multiples of 8 latent pixels (64 px for SD)."""
        return 8 * latent_factor(pl_module)

    def _read_prompts(self, pl_module: pl.LightningModule) -> list[SamplePrompt]:
        return read_prompts_file(self.prompts_file, self._multiple(pl_module), pl_module.num_timesteps - 1)

    def _training_resolution(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The data module's `resolution` if it has one, else the model's image_size in pixels."""
        resolution = getattr(trainer.datamodule, "resolution", None)
        return resolution if isinstance(resolution, int) else pl_module.image_size * latent_factor(pl_module)

    def _batch_prompts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[SamplePrompt]:
        height, width = fit_size(*self._batch_hw, self._training_resolution(trainer, pl_module),
                                 self._multiple(pl_module))
        return [SamplePrompt(caption, self.negative_prompt, width, height, self.seed + i,
                             self._steps(self.sampler), self.guidance_scale, self.sampler)
                for i, caption in enumerate(self._captions)]

    def _steps(self, sampler: str) -> int:
        """The logger's `steps` for its own sampler, else that sampler's default."""
        return (self.steps if sampler == self.sampler else None) or SAMPLERS[sampler][1]

    def _resolve(self, p: SamplePrompt, index: int, pl_module: pl.LightningModule,
                 trainer: pl.Trainer) -> SamplePrompt:
        """Fill the options a prompts-file line left out with the logger's defaults."""
        multiple = self._multiple(pl_module)
        side = max(multiple, self._training_resolution(trainer, pl_module) // multiple * multiple)

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        sampler = pick(p.sampler, self.sampler)
        return SamplePrompt(p.prompt, pick(p.negative_prompt, self.negative_prompt), pick(p.width, side),
                            pick(p.height, side), pick(p.seed, self.seed + index), p.steps or self._steps(sampler),
                            pick(p.guidance_scale, self.guidance_scale), sampler)

    def generate(self, pl_module: pl.LightningModule, prompts: Sequence[SamplePrompt],
                 trainer: pl.Trainer) -> list[Image.Image]:
        """Images for fully resolved prompts; neighbours with the same options share a batch."""
        images: list[Image.Image] = []
        for _, same_options in itertools.groupby(prompts, key=lambda p: dataclasses.replace(p, prompt="", seed=0)):
            same_options = list(same_options)
            for start in range(0, len(same_options), self.max_images):
                images += self._generate_batch(pl_module, same_options[start:start + self.max_images], trainer)
        return images

    def _generate_batch(self, pl_module: pl.LightningModule, group: Sequence[SamplePrompt],
                        trainer: pl.Trainer) -> list[Image.Image]:
        first = group[0]
        return txt2img(pl_module, [p.prompt for p in group], [p.seed for p in group], height=first.height,
                       width=first.width, steps=first.steps, guidance_scale=first.guidance_scale,
                       negative_prompt=first.negative_prompt, sampler=first.sampler,
                       autocast=trainer.precision_plugin.forward_context())

    def _save(self, trainer: pl.Trainer, kind: str, grid: Image.Image, prompts: Sequence[SamplePrompt]) -> None:
        """Queue the grid's PNG, its prompts and its TensorBoard image for the writer thread."""
        folder = (self.logdir or Path(trainer.default_root_dir)) / "images" / "train"
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / f"samples_gs-{trainer.global_step:06d}_e-{trainer.current_epoch:02d}_{kind}"
        text = "".join(p.to_line() + "\n" for p in prompts)
        boards = [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        self._writer.submit(stem.with_suffix(".png"), _write_grid, stem, grid, text, boards, f"samples/{kind}",
                            trainer.global_step)


def _write_grid(stem: Path, grid: Image.Image, text: str, boards: Sequence[Any], tag: str, step: int) -> None:
    grid.save(stem.with_suffix(".png"))
    stem.with_suffix(".txt").write_text(text, encoding="utf-8")
    for board in boards:  # a SummaryWriter: its event file writer is thread-safe
        board.add_image(tag, np.asarray(grid), step, dataformats="HWC")
