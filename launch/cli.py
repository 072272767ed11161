"""The `dgm` command line: prepare data, train, export and sample; submit and manage jobs on Ray clusters."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from launch.arg_types import at_least, int_list, positive, probability_mass, seed

_SAMPLE_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "value_temperature": None, "value_top_p": None,
                    "labels": None, "images": None, "mean_of": 1}  # as the sample parser sets them
EPILOG = ("Overrides: any config key as dotted.path=value (YAML value; a mapping merges into its section), e.g. "
          "trainer.optim.lr=3e-4 zero.stage=3")
DEFAULT_SAMPLES = 16


def _config(args: argparse.Namespace):
    from launch.config import load_config

    return load_config(args.config, args.overrides)


def _split_outputs(cfg, splits: dict, section: str) -> dict[str, str]:
    """Where each named split is written (data.train / data.eval), checked for every split before any is written."""
    targets = {"train": cfg.data.train, "eval": cfg.data.eval}
    missing = [split for split in splits if not targets.get(split)]
    if missing:
        raise ValueError(f"{section}.{missing[0]}: no data.{missing[0]} URL to write it to")
    chosen = {split: targets[split] for split in splits}
    seen: dict[str, str] = {}
    for split, url in chosen.items():
        key = url.rstrip("/") if "://" in url else os.path.abspath(url)
        if key in seen:  # the second split would be written over the first
            raise ValueError(f"data.{seen[key]} and data.{split} are both {url}: give each split its own folder")
        seen[key] = split
    return chosen


def cmd_prepare(args: argparse.Namespace) -> int:
    """Write every split of the config's data.prepare section as shards + manifest."""
    from data_pipeline.codecs import CODECS, build_codec
    from data_pipeline.prepare import (
        PrepareConfig,
        check_codec_fits,
        check_codec_settings_apply,
        check_prepare_output,
        check_shard_count,
        prepare_dataset,
    )
    from data_pipeline.sources import SOURCES, build_source
    from launch.train import ensure_ray
    from trainer.typed_config import ConfigError

    cfg, _ = _config(args)
    spec = cfg.data.prepare
    if spec is None or not spec.splits:
        print(f"{args.config}: data.prepare.splits is empty: nothing to prepare", file=sys.stderr)
        return 2
    outputs = _split_outputs(cfg, spec.splits, "data.prepare.splits")
    # The train split first: it trains the caption tokenizer that the other splits copy.
    plans = []  # every split's settings are checked, and its files scanned once, before any split is written
    for split, settings in sorted(spec.splits.items(), key=lambda kv: kv[0] != "train"):
        where = "data.prepare"
        try:
            pc = PrepareConfig(output=outputs[split], source=spec.source, source_settings=settings, codec=spec.codec,
                               codec_settings=spec.codec_settings, samples_per_shard=spec.samples_per_shard,
                               parallel=not args.no_ray, overwrite=args.overwrite, verify=args.verify,
                               **spec.tokenizer_settings(split, cfg.data.train))
            where = "data.prepare.source" if spec.source not in SOURCES else f"data.prepare.splits.{split}"
            source = build_source(spec.source, settings)
            where = "data.prepare.codec" if spec.codec not in CODECS else "data.prepare.codec_settings"
            codec = build_codec(spec.codec, spec.codec_settings)
            check_codec_settings_apply(pc)
            where = f"data.prepare.splits.{split}"
            check_codec_fits(pc, source, codec)
            check_shard_count(pc, len(source))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{args.config}: {where}: {e}") from e
        plans.append((pc, source))
    for pc, source in plans:  # a split over a different data set is refused before any split is written,
        check_prepare_output(pc, source, retire=False)  # and before --overwrite retires any split's old one
    for pc, source in plans:
        check_prepare_output(pc, source)
    for pc, source in plans:
        if pc.parallel:
            ensure_ray(args.address)
        prepare_dataset(pc, source=source)
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    """Text-to-image: turn each image split of data.tokenize into caption-id + dVAE-code shards at data.<split>."""
    from launch.train import ensure_ray
    from trainer.dalle.tokenise_job import (
        check_splits_agree,
        check_tokenise_output,
        plan_tokenise,
        tokenise_dataset,
    )

    cfg, _ = _config(args)
    spec = cfg.data.tokenize
    if spec is None or not spec.inputs:
        print(f"{args.config}: data.tokenize.inputs is empty: nothing to tokenise", file=sys.stderr)
        return 2
    outputs = _split_outputs(cfg, spec.inputs, "data.tokenize.inputs")
    plans = {split: plan_tokenise(source, spec.dvae_export) for split, source in spec.inputs.items()}
    check_splits_agree(plans)
    for split, source in spec.inputs.items():  # a split over a different data set is refused before any is written
        check_tokenise_output(source, spec.dvae_export, outputs[split], overwrite=args.overwrite, plan=plans[split])
    ensure_ray(args.address)
    for split, source in spec.inputs.items():
        out = outputs[split]
        print(f"[tokenize] {split}: {source} -> {out} with the dVAE {spec.dvae_export}")
        tokenise_dataset(source, spec.dvae_export, out, workers=spec.workers, batch_size=spec.batch_size,
                         overwrite=args.overwrite, verify=args.verify)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from launch.train import run_training

    cfg, raw = _config(args)
    if args.address:
        cfg.cluster.address = args.address
    try:
        metrics = run_training(cfg, raw, stop_after=args.stop_after)
    except Exception:
        import ray

        if ray.is_initialized():  # Ray's log monitor forwards the workers' tracebacks for a while yet: stop it,
            ray.shutdown()  # so the one line naming what failed comes last, not lost in the middle of them
        raise
    step = metrics.get("step")
    paused = bool(args.stop_after) and isinstance(step, int) and step < cfg.trainer.steps
    print(f"[train] {'stopped (--stop-after)' if paused else 'finished'} at step {step} of {cfg.trainer.steps} "
          f"({metrics.get('steps_per_s', 0):.2f} steps/s); checkpoints in {metrics['checkpoint_root']}"
          + ("; the same command without --stop-after goes on from there" if paused else ""))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from launch.export import export_checkpoint
    from launch.run_record import checkpoint_root_of

    cfg, _ = _config(args)
    out = args.out or os.path.join(cfg.run_dir, "export")
    out = export_checkpoint(checkpoint_root_of(cfg), out, args.tag, family=cfg.family, model_config=cfg.model,
                            on_model_change=cfg.trainer.on_model_change)
    print(f"[export] {out}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """No DeepSpeed or Ray: load an export, draw samples, write a PNG grid."""
    import torch

    from trainer.export import load_export_url
    from trainer.families.base import DRAW_OPTIONS
    from trainer.images import save_grid

    out = _sample_out(args)  # checked before any work
    family, modules, _ = load_export_url(args.export)
    given = {name: getattr(args, name) for name in DRAW_OPTIONS if getattr(args, name) != _SAMPLE_DEFAULTS[name]}
    refused = [name for name in given if name not in family.draw_options]
    if refused:
        flags = ", ".join("--" + name.replace("_", "-") for name in refused)
        takes = ", ".join("--" + name.replace("_", "-") for name in DRAW_OPTIONS if name in family.draw_options)
        kind = f"{family.name!r} export" + (f" ({family.variant})" if family.variant else "")
        raise ValueError(f"{args.export}: a {kind} does not take {flags} (it takes "
                         f"{takes or 'no sampling option'})")
    if args.prompt is not None or args.rerank:
        if args.labels or args.images:
            raise ValueError("--labels and --images condition image exports; a --prompt draws from the caption")
        args.n = DEFAULT_SAMPLES if args.n is None else args.n
        return _sample_prompt(args, family, modules, given)
    if args.keep:
        raise ValueError("--keep chooses among the candidates of --prompt; without a prompt every sample is kept")
    options = dict(given)
    counts = {}  # one sample per label / per image: every count given must agree
    if args.n is not None:
        counts["--n"] = args.n
    if args.labels:
        counts["--labels"] = len(args.labels)
    if args.images:
        from data_pipeline.sources.image_folder import load_image

        files = _image_files(args.images)
        if os.path.exists(out) and any(os.path.samefile(out, f) for f in files):
            raise ValueError(f"--out {out} is one of the --images files: the grid would replace the image it was "
                             "drawn from")
        options["images"] = [load_image(f) for f in files]
        counts[f"--images {args.images}"] = len(options["images"])
    if len(set(counts.values())) > 1:
        raise ValueError("sample counts disagree: " + ", ".join(f"{k} gives {v}" for k, v in counts.items())
                         + " (one sample per label and per image)")
    args.n = next(iter(counts.values()), DEFAULT_SAMPLES)
    gen = torch.Generator().manual_seed(args.seed)
    try:
        images = _draw(family, modules, args.n, gen, **options)
    except ValueError as e:  # the family numbers the images it was given: name the file instead
        raise _named_image_error(e, files if args.images else []) from None
    save_grid(images, out)
    print(f"[sample] {args.n} samples -> {out}")
    return 0


def _draw(family, modules, n: int, gen, **options):
    """``family.sample_images``, with torch's allocator failure for too large an ``--n`` said in one line."""
    import torch

    try:
        images = family.sample_images(modules, n, gen, **options)
    except RuntimeError as e:
        if "allocate" not in str(e):
            raise
        raise MemoryError(f"--n {n}: too many samples to draw at once in this machine's memory "
                          f"({str(e).splitlines()[0][:200]}); draw fewer per call") from None
    if not torch.isfinite(images).all():  # a generator network draws NaN pixels where a sampler sees NaN logits
        raise ValueError("the model draws non-finite pixels (NaN or inf): its weights are broken, e.g. exported "
                         "from a run whose training diverged")
    return images


def _sample_out(args: argparse.Namespace) -> str:
    """Where the grid goes: a .png path, so that no other file (an export's weights or config) is replaced by it."""
    from trainer.images import check_not_a_folder

    out = args.out or _default_out(args.export)
    if "://" in out:
        raise ValueError(f"--out {out}: the grid is written to this machine; give a local .png path")
    check_not_a_folder(out)
    if not out.lower().endswith(".png"):
        raise ValueError(f"--out {out}: the sample grid is a PNG; give a path ending in .png")
    return out


def _default_out(export: str) -> str:
    """<export>/samples.png for an export folder; ./samples.png for an s3:// one (a grid is written locally)."""
    return "samples.png" if "://" in export else os.path.join(export, "samples.png")


def _tag(text: str) -> str:
    """--tag names a checkpoint: an empty one (a shell variable that was not set) is not taken for "latest"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty tag; give one such as step-00000200, or leave --tag out for the "
                                         "latest checkpoint")
    return text


def _image_path(text: str) -> str:
    """--images: an empty path (a shell variable that was not set) is not taken for "the default images"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give an image file or folder, or leave --images out for "
                                         "the export's held-out scenes")
    return text


def _image_files(path: str) -> list:
    """The files of ``--images``: one JPEG/PNG file, or every one below a folder (sorted by relative path)."""
    from pathlib import Path

    from data_pipeline.sources.image_folder import find_images

    where = Path(path)
    if where.is_dir():
        files = list(find_images(where).values())
        if not files:
            raise ValueError(f"--images {path}: the folder holds no .jpg, .jpeg or .png files")
        return files
    if where.is_file():
        return [where]
    raise ValueError(f"--images {path}: no such file or folder")


def _named_image_error(error: ValueError, files: list) -> ValueError:
    """``image 3: size 398x398 ...`` -> ``--images <its file>: size 398x398 ...``, with advice `dgm sample` can
    follow (an export's size_policy is fixed)."""
    import re

    said = re.match(r"image (\d+): (.*)", str(error), re.S)
    if not said or int(said.group(1)) >= len(files):
        return error
    problem = said.group(2).replace("; set size_policy='crop' or 'pad', or resize it first",
                                    "; resize it to the export's codec resolution")
    return ValueError(f"--images {files[int(said.group(1))]}: {problem}")


def _sample_prompt(args: argparse.Namespace, family, modules, options: dict) -> int:
    """Text-to-image: ``--n`` candidates for one prompt, reranked by a contrastive export, the best ``--keep`` kept."""
    import torch

    from trainer.export import load_export_url
    from trainer.images import save_grid

    if args.prompt is None:
        raise ValueError("--rerank needs --prompt (reranking scores images against a caption)")
    if not family.takes_prompt:
        raise ValueError(f"{args.export}: a {family.name!r} export does not take --prompt (text-to-image 'dalle' "
                         "exports do)")
    if not 0 <= args.keep <= args.n:
        raise ValueError(f"--keep {args.keep}: must be between 1 and --n ({args.n}), or 0 for all")
    _, truncated, unknown = family.text_ids(args.prompt)
    if unknown:
        print(f"[sample] warning: words with characters the tokenizer never saw: {', '.join(unknown)} "
              "(spelled out with byte tokens)", file=sys.stderr)
    if truncated:
        print("[sample] warning: the prompt is longer than the model's text length; only its first "
              f"{family.text_len} tokens are used", file=sys.stderr)
    if args.rerank:  # loaded and checked before the draw, not after it
        clip_family, clip_modules, _ = load_export_url(args.rerank)
        if not hasattr(clip_family, "score"):
            raise ValueError(f"--rerank {args.rerank}: a {clip_family.name!r} export cannot score images "
                             "(train a `contrastive` model)")
    gen = torch.Generator().manual_seed(args.seed)
    images = _draw(family, modules, args.n, gen, prompt=[args.prompt] * args.n, **options)
    keep = args.keep or args.n
    if args.rerank:
        with torch.no_grad():
            scores = clip_family.score(clip_modules, images, [args.prompt] * args.n)
        order = torch.argsort(scores, descending=True)
        images = images[order]
        print("[sample] reranked scores: " + " ".join(f"{float(scores[i]):.3f}" for i in order[:keep]))
    images = images[:keep]
    out = _sample_out(args)
    save_grid(images, out)
    print(f"[sample] {len(images)} of {args.n} candidates for {args.prompt!r} -> {out}")
    return 0


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgm", description=__doc__, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    p = sub.add_parser("prepare", help="write the config's data sets as WebDataset shards + manifest.json",
                       description="Writes each split of data.prepare to data.<split> (a folder or s3:// URL), "
                       "one Ray task per shard; re-running finishes only the missing shards.", epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--no-ray", action="store_true", help="write shards in this process instead of Ray tasks")
    p.add_argument("--address", default="", help="existing Ray cluster address (default: embedded local cluster)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different data set already at an output (refused otherwise)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the shards an earlier run wrote (downloads them from S3) and rewrite any whose "
                        "sha256 differs: repairs a shard that training reports as a sha256 mismatch")
    commands["prepare"] = cmd_prepare

    p = sub.add_parser("tokenize", help="image shards -> caption-id + dVAE-code shards (text-to-image stage 2 data)",
                       description="Runs data.tokenize's dVAE export over each input split on Ray workers (each "
                       "loads the dVAE once); re-running finishes only the missing shards.", epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--address", default="", help="existing Ray cluster address (default: embedded local cluster)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different data set already at an output (refused otherwise)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the token shards an earlier run wrote (downloads them from S3) and rewrite any "
                        "whose sha256 differs: repairs a shard that training reports as a sha256 mismatch")
    commands["tokenize"] = cmd_tokenize

    p = sub.add_parser("train", help="train with DeepSpeed ZeRO on a Ray Train worker group",
                       description="Starts an embedded local Ray cluster (or joins --address), runs "
                       "cluster.workers ranks, resumes from the latest complete checkpoint of the run if any.",
                       epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--address", default="", help="existing Ray cluster address, or 'auto'")
    p.add_argument("--stop-after", type=at_least(0, int), default=0,
                   help="stop after this many steps of this invocation, saving a checkpoint there to resume from")
    commands["train"] = cmd_train

    p = sub.add_parser("export", help="checkpoint -> safetensors + config.json loadable without DeepSpeed or Ray",
                       description="Consolidates the ZeRO partitions of the latest (or --tag) checkpoint.",
                       epilog=EPILOG)
    _add_config_args(p)
    p.add_argument("--out", default="", help="export folder (default: <run_dir>/export)")
    p.add_argument("--tag", default=None, type=_tag, help="checkpoint tag such as step-00000200 (default: latest)")
    commands["export"] = cmd_export

    p = sub.add_parser("sample", help="draw samples from an export into a PNG grid (no DeepSpeed or Ray)",
                       description="Loads an export folder (no DeepSpeed or Ray) and writes a grid of samples.")
    p.add_argument("export", help="export folder written by `dgm export`")
    p.add_argument("--out", default="", help="PNG path (default: <export>/samples.png; ./samples.png for s3://)")
    p.add_argument("--n", type=positive(int), default=None,
                   help=f"number of samples (default {DEFAULT_SAMPLES}; one per --labels entry or --images file)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--temperature", type=at_least(0.0, meaning="0 draws greedily"),
                   default=_SAMPLE_DEFAULTS["temperature"],
                   help="softmax temperature; 0 draws the most likely token")
    p.add_argument("--top-k", type=at_least(0, int, "0 keeps every token"), default=_SAMPLE_DEFAULTS["top_k"],
                   help="draw among the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=probability_mass, default=_SAMPLE_DEFAULTS["top_p"],
                   help="nucleus sampling: the smallest set of tokens holding this mass, in (0, 1] (1: all)")
    p.add_argument("--value-temperature", type=at_least(0.0, meaning="0 draws greedily"),
                   default=_SAMPLE_DEFAULTS["value_temperature"],
                   help="DCTransformer: the value decoder's temperature (default: --temperature)")
    p.add_argument("--value-top-p", type=probability_mass, default=_SAMPLE_DEFAULTS["value_top_p"],
                   help="DCTransformer: the value decoder's nucleus mass (default: --top-p); with --top-p < 1 "
                        "and --value-top-p 1 the cut trims where coefficients go, not their values")
    p.add_argument("--labels", type=int_list, default=_SAMPLE_DEFAULTS["labels"],
                   help="comma-separated class labels, one sample each (class-conditional models)")
    p.add_argument("--prompt", default=None, help="caption for a text-to-image export; --n candidates are drawn")
    p.add_argument("--rerank", default="", help="contrastive export that orders the candidates best first")
    p.add_argument("--keep", type=at_least(0, int, "0 keeps all"), default=0,
                   help="keep only the best N candidates (default: all)")
    p.add_argument("--images", type=_image_path, default=_SAMPLE_DEFAULTS["images"], metavar="PATH",
                   help="colourisation / super-resolution DCTransformer exports: condition on this image file or "
                        "folder of them (default: the last scenes of the export's held-out source, the training "
                        "source if the run had none). Super-resolution takes images at half the model's size as "
                        "they are, and full-size ones through the codec, downsampled")
    p.add_argument("--mean-of", type=at_least(1, int), default=_SAMPLE_DEFAULTS["mean_of"], metavar="K",
                   help="conditional DCTransformer (colourise, superres): each image is the mean of K draws")
    commands["sample"] = cmd_sample

    from launch.cli_cluster import add_cluster_commands

    add_cluster_commands(sub, commands)
    parser.set_defaults(_commands=commands)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """argparse stops collecting ``key=value`` overrides at the first flag; those given after one
    (``dgm train cfg.yaml --stop-after 5 trainer.lr=1e-3``) are added here instead of being refused."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    refused = [x for x in extra if not (takes_overrides and "=" in x and not x.startswith("-"))]
    if refused:
        parser.error(f"unrecognized arguments: {' '.join(refused)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    from launch.errors import USER_ERRORS

    try:
        return args._commands[args.command](args)
    except USER_ERRORS as e:
        said = str(e) or (f"{type(e).__name__}: out of this machine's memory" if isinstance(e, MemoryError)
                          else type(e).__name__)  # Python's own MemoryError() says nothing
        print(f"dgm {args.command}: error: {said}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):  # e.g. other ranks' errors beside the one said
            print(f"dgm {args.command}: error: {note}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
