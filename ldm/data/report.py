"""The data plan report: what `--dry_run` prints and `dataset_plan.json` holds (pure).

`build_report(...)` gathers the numbers into a JSON-ready dict; `render_report(d)` turns
that dict into the text shown to the user, so both always say the same thing. The dict's
`kohya` entry holds the dataset numbers of kohya's `ss_*` LoRA metadata (`kohya_metadata`),
and its `fields` the data options as `ss_*` header keys (`kohya_fields`).
"""
from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from typing import Any, Callable, Mapping, Sequence

from ldm.data.buckets import cover_scale
from ldm.data.caption_ops import CaptionOptions, process_tags
from ldm.data.plan import EpochPlanner, derive_seed
from ldm.data.scan import ImageRecord, ScanResult

MAX_CAPTION_TOKENS = 75  # SD 1.x: 77 positions minus BOS and EOS
EXAMPLES = 5             # examples shown per list in the text (the JSON keeps up to 50)


def default_token_counter() -> Callable[[str], int]:
    """The SD 1.x CLIP token counter (content tokens), imported only when a report needs it."""
    from ldm.modules.encoders.tokenizer import token_count
    return token_count


def top_folder(path: str) -> str:
    return path.split("/", 1)[0] if "/" in path else "(data_root)"


def build_report(scan: ScanResult, planner: EpochPlanner, *, held_out: Sequence[ImageRecord] = (),
                 world_size: int = 1, epochs: int | None = None, accumulate_grad_batches: int = 1,
                 token_counter: Callable[[str], int] | None = None,
                 settings: Mapping[str, Any] | None = None, warnings: Sequence[str] = (),
                 reg_scan: ScanResult | None = None, prior_loss_weight: float = 1.0,
                 caption_options: Callable[[int], CaptionOptions] | None = None) -> dict:
    """`reg_scan` is the regularisation folder's scan when the planner has regularisation records;
    `caption_options(i)` gives record i's caption options (training only)."""
    records, n_train = planner.records, planner.n_train
    train, reg = records[:n_train], records[n_train:]
    plan = planner.plan(0, world_size)
    per_bucket: dict[str, dict] = {}
    counts, own = planner.counts(0), planner.own_counts(0)
    for b in planner.buckets:
        members = planner.members[b]
        per_bucket[str(b)] = {"bucket": str(b), "width": b.width, "height": b.height, "images": len(members),
                              "reg_images": sum(planner.is_reg(i) for i in members),
                              "samples": sum(counts[i] for i in members), "batches": 0, "fills": 0,
                              "dropped": 0, "upscaled": sum(cover_scale(records[i].width, records[i].height, b) > 1
                                                            for i in members)}
    placed: Counter = Counter()
    for batch in plan.batches:
        entry = per_bucket[str(batch.bucket)]
        entry["batches"] += 1
        entry["fills"] += batch.fills
        placed[str(batch.bucket)] += len(batch.items) - batch.fills
    for name, entry in per_bucket.items():
        entry["dropped"] = entry["samples"] - placed[name]

    upscaled = sorted(((cover_scale(r.width, r.height, planner.bucket_of[i]), i) for i, r in enumerate(records)),
                      reverse=True)
    upscaled = [{"path": ("reg: " if planner.is_reg(i) else "") + records[i].path,
                 "size": f"{records[i].width}x{records[i].height}",
                 "bucket": str(planner.bucket_of[i]), "scale": round(s, 2)} for s, i in upscaled if s > 1]

    steps_per_epoch = math.ceil(plan.steps / accumulate_grad_batches) if plan.steps else 0
    train_samples = sum(counts[:n_train])
    mean_repeats = train_samples / n_train if n_train else 0.0
    reg_factor = 2 if reg else 1  # the regularisation samples match the training samples
    divisor = planner.batch_size * world_size * accumulate_grad_batches
    steps = {"batch_size": planner.batch_size, "world_size": world_size,
             "accumulate_grad_batches": accumulate_grad_batches, "batches_per_epoch": len(plan.batches),
             "batches_per_rank": plan.steps, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
             "total_steps": steps_per_epoch * epochs if epochs else None,
             "formula_repeats": round(mean_repeats, 4), "formula_reg_factor": reg_factor,
             "formula_steps_per_epoch": round(n_train * mean_repeats * reg_factor / divisor, 2),
             "formula_total_steps": (round(n_train * mean_repeats * epochs * reg_factor / divisor, 2)
                                     if epochs else None)}

    warn = list(warnings)
    for sc in [scan] + ([reg_scan] if reg_scan is not None else []):
        if sc.unread:
            warn.append(f"EveryDream 2 files that are not read here: {', '.join(sc.unread[:EXAMPLES])}; set options "
                        "per folder with flip_p.txt, cond_dropout.txt, loss_scale.txt, shuffle_tags.txt, "
                        "tag_dropout.txt and keep_tokens.txt (doc/DATA.md)")
    for b in planner.buckets:
        if len(planner.members[b]) < planner.batch_size:
            warn.append(f"bucket {b} has {len(planner.members[b])} image(s), fewer than batch_size "
                        f"{planner.batch_size}: its batches repeat images")

    return {
        "data_root": scan.data_root,
        "settings": dict(settings or {}),
        "folders": _folders(scan, held_out),
        "images_found": len(scan.images),
        "training_images": n_train,
        "held_out_images": len(held_out),
        "skipped": [{"path": s.path, "reason": s.reason} for s in scan.skipped],
        "orphan_captions": scan.orphan_captions[:50],
        "orphan_caption_count": len(scan.orphan_captions),
        "ignored_files": dict(sorted(scan.ignored.items())),
        "folder_weights": _folder_weights(scan.images),
        "buckets": list(per_bucket.values()),
        "epoch": {"samples": plan.samples, "training_samples": train_samples,
                  "regularisation_samples": plan.samples - train_samples, "fills": plan.fills,
                  "dropped": plan.dropped, "pad_batches": plan.pad_batches, "incomplete": planner.incomplete},
        "steps": steps,
        "upscaled": {"count": len(upscaled), "examples": upscaled[:50]},
        "captions": _caption_stats(train, planner.seed, token_counter, caption_options),
        "folder_settings": _folder_settings(records, planner),
        "regularisation": _regularisation(reg_scan, reg, own[n_train:], train_samples, plan.samples - train_samples,
                                          prior_loss_weight) if reg else None,
        "kohya": {**kohya_metadata(train, counts[:n_train], reg, own[n_train:]),
                  "fields": kohya_fields(settings or {}, train, caption_options)},
        "warnings": warn,
    }


def _folders(scan: ScanResult, held_out: Sequence[ImageRecord] = ()) -> list[dict]:
    found = Counter(top_folder(r.path) for r in scan.images)
    skipped = Counter(top_folder(s.path) for s in scan.skipped)
    held = Counter(top_folder(r.path) for r in held_out)
    return [{"folder": f, "images": found[f], "held_out": held[f], "skipped": skipped[f]}
            for f in sorted(set(found) | set(skipped))]


def _regularisation(scan: ScanResult, reg: Sequence[ImageRecord], own_counts: Sequence[int], train_samples: int,
                    reg_samples: int, prior_loss_weight: float) -> dict:
    """The regularisation part of the report; `own_counts` are its copies before matching."""
    before = sum(own_counts)
    summary = (f"{train_samples} training samples + {reg_samples} regularisation samples per epoch = "
               f"{train_samples + reg_samples} samples: steps per epoch are doubled by the regularisation images")
    if before != reg_samples:
        how = "cycled" if before < reg_samples else "cut (which ones changes every epoch)"
        summary += f" ({before} regularisation copies after repeats, {how} to match the training samples)"
    return {"data_root": scan.data_root, "images_found": len(scan.images), "images": len(reg),
            "prior_loss_weight": prior_loss_weight, "samples_before_matching": before, "samples": reg_samples,
            "summary": summary, "folders": _folders(scan),
            "skipped": [{"path": s.path, "reason": s.reason} for s in scan.skipped],
            "orphan_caption_count": len(scan.orphan_captions), "ignored_files": dict(sorted(scan.ignored.items())),
            "folder_weights": _folder_weights(scan.images),
            "caption_sources": dict(Counter(r.caption_source for r in reg)),
            "empty_captions": sum(1 for r in reg if not r.caption)}


def kohya_metadata(train: Sequence[ImageRecord], train_counts: Sequence[int], reg: Sequence[ImageRecord],
                   reg_counts: Sequence[int]) -> dict:
    """kohya's dataset metadata (`ss_dataset_dirs`, `ss_reg_dataset_dirs`, `ss_tag_frequency`,
    `ss_num_train_images`, `ss_num_reg_images`) from records and their copies per epoch (the
    regularisation copies before they are matched to the training count, as kohya counts them).

    A top-level folder's `n_repeats` is its copies per image per epoch, rounded (at least 1);
    tags are the captions split on ",", stripped and lower-cased, each occurrence counted once
    (not per copy), as kohya counts them."""
    def dirs(records: Sequence[ImageRecord], counts: Sequence[int]) -> dict:
        images, copies = Counter(), Counter()
        for r, c in zip(records, counts):
            images[top_folder(r.path)] += 1
            copies[top_folder(r.path)] += c
        return {f: {"n_repeats": max(1, math.floor(copies[f] / n + 0.5)), "img_count": n}
                for f, n in sorted(images.items())}

    tags: dict[str, Counter] = {f: Counter() for f in sorted({top_folder(r.path) for r in train})}
    for r in train:
        tags[top_folder(r.path)].update(t.strip().lower() for t in r.caption.split(",") if t.strip())
    return {"dataset_dirs": dirs(train, train_counts), "reg_dataset_dirs": dirs(reg, reg_counts),
            "tag_frequency": {f: dict(c) for f, c in tags.items()},
            "num_train_images": sum(train_counts), "num_reg_images": sum(reg_counts)}


def kohya_fields(settings: Mapping[str, Any], train: Sequence[ImageRecord],
                 caption_options: Callable[[int], CaptionOptions] | None) -> dict[str, str]:
    """The data options as kohya's header keys, strings as kohya writes them. Flip and shuffle
    are "True" when any training image gets them (a settings file may turn them on for one
    folder); the numbers are the config's. Empty for a dataset without these options."""
    if "flip_p" not in settings or caption_options is None:
        return {}
    flip = any((r.settings.flip_p if r.settings.flip_p is not None else settings["flip_p"]) > 0 for r in train)
    shuffle = any(caption_options(i).shuffle_tags for i in range(len(train)))
    return {"ss_flip_aug": str(flip), "ss_shuffle_caption": str(shuffle),
            "ss_keep_tokens": str(int(settings.get("keep_tokens", 0))),
            "ss_caption_dropout_rate": str(float(settings["conditional_dropout"])),
            "ss_caption_tag_dropout_rate": str(float(settings.get("tag_dropout", 0.0))),
            "ss_random_crop": str(float(settings.get("crop_jitter", 0.0)) > 0), "ss_color_aug": "False"}


def _folder_settings(records: Sequence[ImageRecord], planner: EpochPlanner) -> list[dict]:
    """Images grouped by the settings files that apply to them (none: not listed)."""
    groups: Counter = Counter()
    for i, r in enumerate(records):
        if r.settings.overrides():
            groups[(planner.is_reg(i), r.folder, tuple(sorted(r.settings.overrides().items())))] += 1
    return [{"folder": ("reg: " if reg else "") + (folder or "(data_root)"), "images": n, **dict(values)}
            for (reg, folder, values), n in sorted(groups.items())]


def _folder_weights(records: Sequence[ImageRecord]) -> list[dict]:
    groups: dict[tuple[str, int, float], int] = defaultdict(int)
    for r in records:
        if r.folder_repeats != 1 or r.multiply != 1:
            groups[(r.folder, r.folder_repeats, r.multiply)] += 1
    return [{"folder": f or "(data_root)", "images": n, "folder_repeats": fr, "multiply": m}
            for (f, fr, m), n in sorted(groups.items())]


def _caption_stats(records: Sequence[ImageRecord], seed: int, token_counter: Callable[[str], int] | None,
                   caption_options: Callable[[int], CaptionOptions] | None = None) -> dict:
    order = sorted(range(len(records)), key=lambda i: derive_seed(seed, "sample_captions", records[i].path))

    def sample(i: int) -> dict:
        r, out = records[i], {"path": records[i].path, "caption": records[i].caption}
        options = caption_options(i) if caption_options is not None else CaptionOptions()
        trained = process_tags(r.caption, options, random.Random(derive_seed(seed, "sample_caption", r.path)))
        if trained != r.caption:
            out["as_trained"] = trained  # one draw of the tag options
        return out

    cut = [r for r in records if r.caption_cut]
    stats: dict[str, Any] = {
        "sources": dict(Counter(r.caption_source for r in records)),
        "empty": sum(1 for r in records if not r.caption),
        "cut_at_underscore": {"count": len(cut), "examples": [{"path": r.path, "caption": r.caption}
                                                              for r in cut[:50]]},
        "samples": [sample(i) for i in order[:EXAMPLES]],
        "long": None,
    }
    if token_counter is not None:
        tokens = {c: token_counter(c) for c in {r.caption for r in records}}
        long = [r for r in records if tokens[r.caption] > MAX_CAPTION_TOKENS]
        stats["long"] = {"limit": MAX_CAPTION_TOKENS, "count": len(long),
                         "examples": [{"path": r.path, "tokens": tokens[r.caption]} for r in long[:50]]}
    return stats


def render_report(d: Mapping[str, Any]) -> str:
    lines = [f"Data plan for {d['data_root']}"]
    lines.append(f"  images found: {d['images_found']}, skipped: {len(d['skipped'])}, "
                 f"held out for validation: {d['held_out_images']}, training: {d['training_images']}")
    lines.append("  per top-level folder (images / held out / skipped):")
    lines += [f"    {f['folder']}: {f['images']} / {f['held_out']} / {f['skipped']}" for f in d["folders"]]
    if d["skipped"]:
        lines.append(f"Skipped files ({len(d['skipped'])}):")
        lines += [f"  {s['path']}: {s['reason']}" for s in d["skipped"]]
    if d["orphan_caption_count"]:
        lines.append(f"Caption files with no image of the same name: {d['orphan_caption_count']}, e.g. "
                     + ", ".join(d["orphan_captions"][:EXAMPLES]))
    if d["ignored_files"]:
        lines.append("Other files ignored: " + ", ".join(f"{ext} {n}" for ext, n in d["ignored_files"].items()))
    for w in d["folder_weights"]:
        lines.append(f"Folder {w['folder']}: {w['images']} images x folder repeats {w['folder_repeats']}"
                     f" x multiply {w['multiply']:g}")
    reg = d["regularisation"] is not None
    lines.append("Buckets (images, samples per epoch, batches, fills, dropped, upscaled"
                 + (", of the images regularisation):" if reg else "):"))
    lines += [f"  {b['bucket']:>9}: {b['images']:6d} {b['samples']:7d} {b['batches']:6d} {b['fills']:5d} "
              f"{b['dropped']:5d} {b['upscaled']:5d}" + (f" {b['reg_images']:6d}" if reg else "")
              for b in d["buckets"]]
    e, s = d["epoch"], d["steps"]
    how = {"fill": "partial batches filled", "drop": "partial batches dropped",
           "keep": "partial batches kept"}[e["incomplete"]]
    lines.append(f"Per epoch: {e['samples']} samples after repeats; {how}: {e['fills']} fills, "
                 f"{e['dropped']} dropped, {e['pad_batches']} whole batches added to even out "
                 f"{s['world_size']} rank(s)")
    if reg:
        lines.append(f"  {d['regularisation']['summary']}")
    lines.append(f"  {s['batches_per_epoch']} batches of {s['batch_size']} = {s['batches_per_rank']} per rank "
                 f"= {s['steps_per_epoch']} optimizer steps per epoch (accumulate_grad_batches "
                 f"{s['accumulate_grad_batches']})")
    formula = (f"{d['training_images']} images x {s['formula_repeats']:g} repeats x {s['epochs'] or 1} epochs / "
               f"{s['batch_size']}" + (f" / {s['world_size']} ranks" if s["world_size"] > 1 else "")
               + (f" / {s['accumulate_grad_batches']} accum" if s["accumulate_grad_batches"] > 1 else "")
               + (" x 2 regularisation" if s["formula_reg_factor"] == 2 else ""))
    if s["epochs"]:
        lines.append(f"Total for {s['epochs']} epochs: exact {s['total_steps']} steps; "
                     f"formula {formula} = {s['formula_total_steps']:g}")
    else:
        lines.append(f"Steps per epoch: exact {s['steps_per_epoch']}; formula {formula} = "
                     f"{s['formula_steps_per_epoch']:g} (epochs not given)")
    if d["upscaled"]["count"]:
        lines.append(f"Upscaled to fit their bucket: {d['upscaled']['count']} images, largest: "
                     + ", ".join(f"{u['path']} ({u['size']} -> {u['bucket']}, x{u['scale']})"
                                 for u in d["upscaled"]["examples"][:EXAMPLES]))
    c = d["captions"]
    lines.append("Captions from: " + ", ".join(f"{k} {n}" for k, n in sorted(c["sources"].items()))
                 + (f"; empty: {c['empty']}" if c["empty"] else ""))
    if c["cut_at_underscore"]["count"]:
        lines.append(f"  {c['cut_at_underscore']['count']} file-name captions were cut at an underscore "
                     "(set caption_from_filename: strip_suffix_only to keep the whole name), e.g. "
                     + ", ".join(f"{x['path']} -> {x['caption']!r}" for x in c["cut_at_underscore"]["examples"][:3]))
    if c["long"] is not None and c["long"]["count"]:
        examples = ", ".join(f"{x['path']} ({x['tokens']} tokens)" for x in c["long"]["examples"][:EXAMPLES])
        lines.append(f"  {c['long']['count']} captions exceed {c['long']['limit']} tokens and will be cut by the "
                     f"text encoder (unless its max_length is 150 or 225), e.g. {examples}")
    lines.append("  sample captions:")
    lines += [f"    {x['path']}: {x['caption']!r}" + (f" -> e.g. {x['as_trained']!r}" if "as_trained" in x else "")
              for x in c["samples"]]
    for f in d.get("folder_settings", []):
        values = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()
                           if k not in ("folder", "images"))
        lines.append(f"Folder settings {f['folder']} ({f['images']} images): {values}")
    if reg:
        lines += _render_regularisation(d["regularisation"])
    lines += [f"Warning: {w}" for w in d["warnings"]]
    return "\n".join(lines)


def _render_regularisation(g: Mapping[str, Any]) -> list[str]:
    lines = [f"Regularisation images from {g['data_root']}: found {g['images_found']}, skipped "
             f"{len(g['skipped'])}, used {g['images']}; loss weight (prior_loss_weight) {g['prior_loss_weight']:g}",
             "  per top-level folder (images / skipped):"]
    lines += [f"    {f['folder']}: {f['images']} / {f['skipped']}" for f in g["folders"]]
    lines += [f"  skipped {s['path']}: {s['reason']}" for s in g["skipped"]]
    lines += [f"  folder {w['folder']}: {w['images']} images x folder repeats {w['folder_repeats']}"
              f" x multiply {w['multiply']:g}" for w in g["folder_weights"]]
    if g["orphan_caption_count"]:
        lines.append(f"  caption files with no image of the same name: {g['orphan_caption_count']}")
    if g["ignored_files"]:
        lines.append("  other files ignored: " + ", ".join(f"{ext} {n}" for ext, n in g["ignored_files"].items()))
    lines.append("  captions from: " + ", ".join(f"{k} {n}" for k, n in sorted(g["caption_sources"].items()))
                 + (f"; empty: {g['empty_captions']}" if g["empty_captions"] else ""))
    return lines
