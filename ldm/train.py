"""The `main.py` command line: parse, configure, build, train.

    python main.py --base cfg.yaml [more.yaml ...] -t --actual_resume sd.ckpt -n Name \
                   --data_root path/to/images [key.path=value ...]

Everything a test needs is reachable through `main(argv)`; main.py only calls it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.util import ConfigError, launcher_rank

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Fine-tune a Stable Diffusion 1.x/2.x checkpoint on a folder of captioned images.",
        epilog="Trailing key.path=value tokens override any config key, e.g. "
               "lightning.trainer.max_epochs=6 data.params.batch_size=4. See doc/CONFIG.md.",
    )
    p.add_argument("-b", "--base", nargs="+", default=[], metavar="YAML",
                   help="config files, merged left to right")
    p.add_argument("-t", "--train", action="store_true", help="train (without it, only build and check the run)")
    p.add_argument("--actual_resume", metavar="CKPT",
                   help="initial weights: an SD .ckpt/.safetensors file (weights only; no optimizer or step)")
    p.add_argument("-n", "--name", default="", help="run name, the suffix of the log folder")
    p.add_argument("--data_root", metavar="DIR", help="folder of training images (searched recursively)")
    p.add_argument("--reg_data_root", metavar="DIR",
                   help="folder of regularisation images, mixed into the batches with data.params.train.params."
                        "prior_loss_weight (kohya's reg folder)")
    p.add_argument("--network_weights", metavar="FILE",
                   help="an adapter .safetensors (ours or kohya's) to continue training from; needs a "
                        "model.params.network section (configs/lora/*.yaml)")
    p.add_argument("-r", "--resume", metavar="LOGDIR_OR_CKPT",
                   help="continue training a run (implies -t): its log folder (uses checkpoints/last.ckpt) or a "
                        "checkpoint in it; restores weights, EMA, optimizer, LR schedule, epoch, step, data "
                        "position and the noise RNG, in the same folder")
    p.add_argument("-s", "--seed", type=int, default=None, help="seed for every RNG (default 23)")
    p.add_argument("-l", "--logdir", default="logs", help="parent folder of run folders (default logs)")
    p.add_argument("--devices", "--gpus", dest="devices", default=None,
                   help="GPUs to use: a count (2) or a list (0,1); default: the config's, else 1 GPU if present")
    p.add_argument("--precision", default=None,
                   help="bf16-mixed, 16-mixed or 32 (default: the config's lightning.trainer.precision)")
    p.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=None,
                   help="multiply base_learning_rate by batch size x accumulation x devices")
    p.add_argument("--dry_run", action="store_true",
                   help="print the data plan (images, buckets, steps for --devices) and stop; needs no "
                        "checkpoint or GPU")
    return p


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, rest = parser.parse_known_args(list(argv))
    bad = [t for t in rest if t.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if args.name and args.resume:
        parser.error("-n/--name cannot be combined with -r/--resume (the run keeps its folder)")
    if args.resume:
        args.train = True  # continuing a run means training it
    return args, rest


def _norm_path(p: str | None) -> Path | None:
    return None if p is None else Path(p.replace("\\", "/")).expanduser()


def resolve_resume(resume: str) -> tuple[Path, Path]:
    """-r LOGDIR or -r LOGDIR/checkpoints/X.ckpt -> (logdir, checkpoint)."""
    path = _norm_path(resume)
    if path.is_file():
        logdir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return logdir, path
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(f"--resume {resume}: no checkpoints/last.ckpt in that folder")
        return path, ckpt
    raise ConfigError(f"--resume {resume}: no such file or folder")


def make_logdir(root: Path, name: str, base: Sequence[str]) -> Path:
    """logs/<YYYY-MM-DDTHH-MM-SS>_<name>/ with configs/, checkpoints/, images/train/."""
    stamp = _dt.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    name = name or (Path(base[0]).stem if base else "run")
    logdir = root / f"{stamp}_{name}"
    n = 1
    while logdir.exists():  # two runs started within the same second
        n += 1
        logdir = root / f"{stamp}_{name}-{n}"
    for sub in ("configs", "checkpoints", "images/train"):
        (logdir / sub).mkdir(parents=True, exist_ok=True)
    return logdir


RUN_DIR_ENV = "LDM_RUN_DIR"  # the run folder, for the processes Lightning starts for ranks > 0


def make_logdir_later(root: Path, name: str, base: Sequence[str]):
    """A callable that makes the run folder when called (after every check has passed).

    With several GPUs, Lightning runs this command again for ranks 1..N-1; those processes
    inherit the environment of rank 0, which names its folder, and use that one."""
    def make() -> Path:
        if os.environ.get(RUN_DIR_ENV) and launcher_rank() > 0:
            return Path(os.environ[RUN_DIR_ENV])
        logdir = make_logdir(root, name, base)
        os.environ[RUN_DIR_ENV] = str(logdir)
        return logdir
    return make


def inject_data_root(cfg: DictConfig, data_root: Path | None) -> None:
    """--data_root goes into every dataset node that takes one."""
    if data_root is None or "data" not in cfg:
        return
    for split in ("train", "validation"):
        node = OmegaConf.select(cfg, f"data.params.{split}")
        if node is not None:
            if node.get("params") is None:
                node.params = {}
            if node.params.get("data_root") is None or split == "train":
                node.params.data_root = str(data_root)


CLI_FLAGS = {"seed": 23, "devices": None, "precision": None, "scale_lr": False,  # saved with a run
             "actual_resume": None}  # an adapter run reloads its frozen base from it on resume


def apply_saved_flags(args: argparse.Namespace, logdir: Path) -> None:
    """A resumed run keeps the flags it was started with (configs/*-cli.json) unless given again."""
    saved = sorted((logdir / "configs").glob("*-cli.json"))
    flags = json.loads(saved[-1].read_text()) if saved else {}
    taken = {k: flags[k] for k in CLI_FLAGS if getattr(args, k) is None and flags.get(k) is not None}
    for key, value in taken.items():
        setattr(args, key, value)
    if taken:
        print("Resuming with the run's own " + ", ".join(f"--{k} {v}" for k, v in taken.items()))


def fill_flag_defaults(args: argparse.Namespace) -> None:
    for key, default in CLI_FLAGS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)


def inject_adapter_flags(cfg: DictConfig, args: argparse.Namespace) -> None:
    """--reg_data_root and --network_weights go to their config keys."""
    if args.reg_data_root is not None:
        node = OmegaConf.select(cfg, "data.params.train")
        if node is None:
            raise ConfigError("--reg_data_root: the config has no data.params.train dataset")
        folder = _norm_path(args.reg_data_root)
        if not folder.is_dir():
            raise ConfigError(f"--reg_data_root {args.reg_data_root}: no such folder")
        OmegaConf.update(cfg, "data.params.train.params.reg_data_root", str(folder), force_add=True)
    if args.network_weights is not None:
        if OmegaConf.select(cfg, "model.params.network") is None:
            raise ConfigError("--network_weights: the config has no model.params.network section; start from an "
                              "adapter config such as configs/lora/lora.yaml")
        path = _norm_path(args.network_weights)
        if not path.is_file():
            raise ConfigError(f"--network_weights {args.network_weights}: no such file")
        OmegaConf.update(cfg, "model.params.network.network_weights", str(path))


def check_data_root(cfg: DictConfig) -> None:
    """A training dataset needs a folder: say so before anything is scanned or built."""
    node = OmegaConf.select(cfg, "data.params.train")
    if node is None:
        return
    root = (node.get("params") or {}).get("data_root")
    if root is None:
        raise ConfigError("no training images: pass --data_root DIR (or set data.params.train.params.data_root)")
    if not Path(root).is_dir():
        raise ConfigError(f"--data_root {root}: no such folder")


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from ldm.config import load_config

    try:
        resume_ckpt, logdir = None, None
        base = list(args.base)
        if args.resume:
            logdir, resume_ckpt = resolve_resume(args.resume)
            saved = sorted((logdir / "configs").glob("*-project.yaml"))
            if not saved:
                raise ConfigError(f"--resume: {logdir}/configs has no *-project.yaml")
            base = [str(saved[-1])] + base
            apply_saved_flags(args, logdir)
        cfg = load_config(base, overrides)
        inject_data_root(cfg, _norm_path(args.data_root))
        inject_adapter_flags(cfg, args)
        check_data_root(cfg)
        fill_flag_defaults(args)
        if args.dry_run:
            return dry_run(cfg, args)
        from ldm.run import run_training  # heavy imports only when training

        if not args.resume:  # a new run folder, made once the data and model are known to be good
            logdir = make_logdir_later(_norm_path(args.logdir), args.name, base)
        return run_training(cfg, args, logdir=logdir, resume_ckpt=resume_ckpt)
    except ValueError as e:  # ConfigError, DatasetError, a constructor's check: each names its key or file
        print(f"error: {e}", file=sys.stderr)
        return 2


def dry_run(cfg: DictConfig, args: argparse.Namespace) -> int:
    from ldm.data.datamodule import plan_report
    from ldm.run import _parse_devices, _world_size

    devices = args.devices if args.devices is not None else OmegaConf.select(cfg, "lightning.trainer.devices")
    text, plan = plan_report(cfg, _world_size(_parse_devices(str(devices))) if devices is not None else 1)
    print(text)
    return 0
