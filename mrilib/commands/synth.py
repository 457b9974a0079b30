"""``python -m mrilib synth``: train the local generators, make and cache variations, time them.

    synth train --split subject --real-frac 0.3 [--seed g] --minutes 9 --device cuda   (rerun until "done")
    synth generate --backend local|openai --real-frac 0.3 --per-image 2 [--generator g]
                   [--seed r] [--json]
    synth bench --device cuda [--out benchmarks/local_generator_h100.json]
    synth bench --levers compile,batch4x [--guidance 1,4] --out FILE   (a row per lever)
    synth lever-quality --lever batch4x --real-frac 0.3 [--generator g] [--out FILE]
    synth sweep --real-frac 0.3 --strengths 0.4,0.6,0.8 [--guidance 1,2,4] [--max-sources N]
    synth shortcut --real-frac 0.3 [--generator g] [--max-sources N] [--out FILE]
    synth keep --real-frac 0.3 [--seed g]   (copy a finished generator into generators/ for git)

``train`` without ``--seed`` trains the grid's generators of X (one per real sample,
``samples`` of :mod:`mrilib.grid`) one after another within the time budget, so
one command, repeated, trains them all in time-limited jobs.

``generate`` exits with :data:`NOT_FULFILLED` when images it was asked for are neither
made nor refused (a budget stopped the run): a rerun resumes.
"""
from __future__ import annotations

import json
import signal
import sys

from .synth_levers import add_bench, add_lever_quality, lever_settings
from .train import checked_fraction, checked_seed, loaded, warn_few_per_class

NOT_FULFILLED = 3  # exit status of a generate run that left images to make


def add_parser(sub) -> None:
    p = sub.add_parser("synth", help="synthetic images: train generators, generate, benchmark, "
                                       "sweep (and choose the guidance weight), shortcut check")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for add in (_add_train, _add_keep, _add_generate, add_bench, _add_sweep, _add_shortcut,
                add_lever_quality):
        add(actions)


def _add_train(actions) -> None:
    t = actions.add_parser("train", help="train or resume the local diffusion generator(s) of a "
                                         "real fraction; prints each checkpoint path")
    t.add_argument("--real-frac", type=float, required=True,
                   help="X: the stratified share of the training pool the generator learns from")
    _add_split(t)
    t.add_argument("--seed", type=int, default=None,
                   help="generator g (its sample seed and training seed), from 0. Default: "
                        "each of the grid's generators in turn")
    t.add_argument("--minutes", type=float, default=None,
                   help="minutes of training in this command, then checkpoint and stop; a rerun "
                        "resumes (use 9 where a command may run 10)")
    t.add_argument("--steps", type=int, default=None,
                   help="optimizer steps in all (default: the preset's); larger extends a run")
    t.add_argument("--leaky", action="store_true",
                   help="ABLATION: train on the whole training pool (leaks images outside the "
                        "sample into the classifier's synthetic data)")
    t.add_argument("--lever", default=None,
                   help="train with a speed lever's settings (e.g. batch4x: four times the "
                        "batch at the same images seen; a generator of its own, judged by "
                        "`synth lever-quality`); see `synth bench --levers`")
    add_common_args(t)
    t.set_defaults(func=run_train)


def _add_keep(actions) -> None:
    k = actions.add_parser("keep", help="copy a finished generator into generators/ (tracked in "
                                        "git), where every checkout finds it without a GPU")
    k.add_argument("--real-frac", type=float, required=True, help="X: the generator's real fraction")
    k.add_argument("--split", choices=("slice", "subject"), default="subject",
                   help="whose real sample (default: the subject split's)")
    k.add_argument("--seed", type=int, default=0, help="generator g (default 0: chapters 2-3's)")
    k.add_argument("--leaky", action="store_true", help="the leaky ablation generator")
    add_common_args(k)
    k.set_defaults(func=run_keep)


def run_keep(args) -> int:
    from ..splits import split_mri
    from ..synthetic.diffusion import keep_generator

    checked_fraction(args.real_frac)
    data = loaded(args)
    path = keep_generator(data, split_mri(data, args.split), args.real_frac, args.seed, args.leaky)
    mib = path.stat().st_size / 2**20
    print(json.dumps({"kept": str(path), "mib": round(mib, 1)}) if args.json else
          f"kept {path} ({mib:.1f} MiB): commit it (git add {path.parent})")
    return 0


def _add_generate(actions) -> None:
    g = actions.add_parser("generate", help="make (or find in the cache) variations of the "
                                            "real sample's images")
    g.add_argument("--backend", choices=("local", "openai"), default="local")
    g.add_argument("--real-frac", type=float, required=True, help="X: the real sample's share")
    _add_split(g)
    g.add_argument("--per-image", type=int, required=True, help="variations per source image")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the variations; openai: also the real sample drawn")
    g.add_argument("--generator", type=int, default=0, metavar="G",
                   help="local: generator g, whose own sample gives the sources (default 0)")
    g.add_argument("--strength", type=float, default=None,
                   help="local: SDEdit noise level, 0 = the source .. 1 = a fresh sample")
    g.add_argument("--guidance", type=float, default=None,
                   help="local: classifier-free guidance weight, 1 = none (default: the "
                        "preset's guidance_scale)")
    g.add_argument("--limit-sources", type=int, default=None,
                   help="use only the first N (1 or more) images of the sample (a trial run)")
    g.add_argument("--leaky", action="store_true", help="local: use the leaky ablation generator")
    g.add_argument("--allow-unfinished", action="store_true",
                   help="local: sample from a generator that has not finished training")
    g.add_argument("--model", default=None, help="openai: GPT Image model for the edit route")
    g.add_argument("--route", choices=("edit", "variation"), default=None,
                   help="openai: 'edit' (current) or 'variation' (DALL-E 2, retired)")
    g.add_argument("--max-images", type=int, default=None,
                   help="openai: stop before more than N possibly billed requests in this "
                        "run (answered or timed out; a rerun resumes and counts afresh)")
    g.add_argument("--max-cost", type=float, default=None,
                   help="openai: stop before this run's estimated spend passes USD")
    g.add_argument("--usd-per-image", type=float, default=None,
                   help="openai: price per request, when the built-in estimate is missing/stale")
    g.add_argument("--base-url", default=None,
                   help="openai: an OpenAI-compatible endpoint (default: the client's)")
    add_common_args(g)
    g.set_defaults(func=run_generate)
    g.epilog = (f"Exits with status {NOT_FULFILLED} when images asked for were not made "
                f"(a budget stopped the run; refused images are counted apart): rerun to "
                f"resume.")


def _add_split(p) -> None:
    p.add_argument("--split", choices=("slice", "subject"), default="subject",
                   help="whose real sample: the subject split's (whole brains, default) or the "
                        "slice split's (the thesis's); each has its own generators")


def add_generator_args(p, verb: str) -> None:
    """--real-frac, --split and --generator: which generator a command reads."""
    p.add_argument("--real-frac", type=float, required=True,
                   help=f"X: the real fraction whose generator is {verb}")
    _add_split(p)
    p.add_argument("--generator", type=int, default=0, help="generator g of X (default 0)")


def _add_sweep(actions) -> None:
    w = actions.add_parser("sweep", help="class fidelity, background and distance from the "
                                         "source of variations at several strengths and "
                                         "guidance weights; chooses the weight on validation")
    add_generator_args(w, "swept")
    w.add_argument("--strengths", default="0.4,0.5,0.6,0.8",
                   help="comma-separated SDEdit noise levels in (0, 1] (default 0.4,0.5,0.6,0.8)")
    w.add_argument("--guidance", default=None,
                   help="comma-separated classifier-free guidance weights >= 1, 1 = none "
                        "(default: the preset's guidance_scale); each is swept over every "
                        "strength")
    w.add_argument("--max-sources", type=int, default=None,
                   help="at most N sources, in equal shares per class (default: the whole "
                        "sample; on a CPU a variation costs seconds)")
    w.add_argument("--seed", type=int, default=0, help="seeds the variations (default 0)")
    w.add_argument("--out", default=None,
                   help="also write the JSON to this file (checked before the sweep)")
    add_common_args(w)
    w.set_defaults(func=run_sweep)


def _add_shortcut(actions) -> None:
    s = actions.add_parser("shortcut", help="can a basic CNN tell a generator's variations from "
                                            "real slices it never saw? (chapter 2's shortcut "
                                            "check)")
    add_generator_args(s, "checked")
    s.add_argument("--max-sources", type=int, default=None,
                   help="at most N sources, in equal shares per class (default: the preset's; "
                        "thesis: the whole sample)")
    s.add_argument("--folds", type=int, default=None,
                   help="folds of sources, each held out once (default: the preset's)")
    s.add_argument("--seed", type=int, default=0,
                   help="seeds the variations, the folds and the classifiers (default 0)")
    s.add_argument("--out", default=None,
                   help="also write the JSON to this file, e.g. results/shortcut_x0.3_g0.json")
    add_common_args(s)
    s.set_defaults(func=run_shortcut)


def add_common_args(p) -> None:
    p.add_argument("--source", default=None,
                   help="data source (default: $MRILIB_DATA, else ../shared/data/alzheimer_mri beside the repo, else the hub dataset)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="skip unreadable or non-image files (counted in a warning) instead of "
                        "stopping; the samples, and so the generators, are then those of the "
                        "readable images")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def checked_start(args, out: str | None = None) -> None:
    """Device and output file, checked before any work: a late failure loses the work."""
    from ..device import resolve_device
    from ..paths import check_writable

    resolve_device(args.device)
    if out:
        check_writable(out, "--out", kind="file")


def _sigterm_as_interrupt() -> None:
    """Let ``timeout``/SIGTERM stop a run like Ctrl-C, so training checkpoints first."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def run_train(args) -> int:
    import time

    from ..splits import split_mri
    from ..synthetic.diffusion import train_for_sample
    from ..synthetic.mixing import real_sample

    _sigterm_as_interrupt()
    if args.seed is not None and args.seed < 0:
        raise ValueError(f"--seed {args.seed}: generators are numbered from 0")
    checked_fraction(args.real_frac)
    changed = lever_settings(args.lever)
    if args.steps is not None and "steps" in changed:
        raise ValueError(f"--steps {args.steps} with --lever {args.lever}: the lever sets the "
                         f"steps ({changed['steps']}, the same images seen); drop --steps")
    steps = changed.pop("steps", args.steps)
    checked_start(args)
    data = loaded(args)
    split = split_mri(data, args.split)
    if args.seed is not None:
        todo = [args.seed]
    elif args.leaky:
        todo = [0]  # one pool generator is the ablation; --seed picks another
    else:
        todo = list(range(_grid_samples()))
    if not args.leaky:
        warn_few_per_class(data, real_sample(data, split, args.real_frac, todo[0]),
                           f"--real-frac {args.real_frac:g}")
    deadline = None if args.minutes is None else time.monotonic() + 60 * args.minutes
    results = []
    for g in todo:
        left = None if deadline is None else max(0.0, (deadline - time.monotonic()) / 60)
        if left == 0.0:
            break
        path = train_for_sample(data, split, args.real_frac, g, leaky=args.leaky, minutes=left,
                                steps=steps, device=args.device, progress=not args.json,
                                **changed)
        meta = json.loads((path.parent / "meta.json").read_text())
        results.append({"generator": g, "checkpoint": str(path), "step": meta["step"],
                        "target_steps": meta["target_steps"], "done": meta["done"],
                        "leaky": args.leaky, "lever": args.lever})
        if not args.json:
            state = "done" if meta["done"] else "unfinished: rerun to resume"
            print(f"generator {g}{' (LEAKY ablation)' if args.leaky else ''}: step "
                  f"{meta['step']}/{meta['target_steps']} ({state})\n  {path}")
    all_done = len(results) == len(todo) and all(r["done"] for r in results)
    if args.json:
        print(json.dumps({"generators": results, "all_done": all_done}, indent=2))
    elif not all_done:
        print("time budget used up; rerun the same command to continue", file=sys.stderr)
    return 0


def _grid_samples() -> int:
    """How many real samples (and so generators) per fraction the grid uses."""
    from ..grid import grid_settings

    return grid_settings()["samples"]


def _checked_generate_args(args) -> None:
    """Every number generate takes, named by its flag when it cannot be used."""
    if args.per_image < 1:
        raise ValueError(f"--per-image {args.per_image}: ask for at least one variation")
    if args.limit_sources is not None and args.limit_sources < 1:
        raise ValueError(f"--limit-sources {args.limit_sources}: give 1 or more source images "
                         f"(leave it out to use the whole sample)")
    if args.generator < 0:
        raise ValueError(f"--generator {args.generator}: generators are numbered from 0")
    checked_seed(args.seed)
    checked_fraction(args.real_frac)


def run_generate(args) -> int:
    from ..splits import split_mri
    from ..synthetic.cache import generate_cached
    from ..synthetic.mixing import real_sample

    _checked_generate_args(args)
    checked_start(args)
    data = loaded(args)
    split = split_mri(data, args.split)
    backend = _backend(args, data, split)
    sample_seed = getattr(backend, "sample_seed", None)
    sample_seed = args.seed if sample_seed is None else sample_seed
    index = real_sample(data, split, args.real_frac, sample_seed)
    warn_few_per_class(data, index, f"--real-frac {args.real_frac:g}")
    if args.limit_sources is not None:
        index = index[:args.limit_sources]
    _, report = generate_cached(backend, data.images[index], data.labels[index],
                                [data.ids[i] for i in index.tolist()], args.per_image,
                                args.seed, progress=not args.json,
                                batch_size=getattr(backend, "max_batch", None))
    summary = {k: v for k, v in report.items() if k != "ok"}
    # The cache counts a refusal as missing too; here what a rerun would still make is apart.
    summary.update(backend=backend.name, params=backend.params(), real_fraction=args.real_frac,
                   seed=args.seed, sample_seed=sample_seed, n_sources=len(index),
                   per_image=args.per_image, requested=len(index) * args.per_image,
                   not_made=report["missing"] - report["refused"])
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['generated']} generated, {summary['cached']} from cache, "
              f"{summary['refused']} refused, {summary['not_made']} not made, of "
              f"{summary['requested']} in {summary['seconds']:.1f} s -> {summary['dir']}")
    if summary["not_made"]:
        why = summary["stopped"] or "the run stopped early"
        print(f"{summary['not_made']} of {summary['requested']} images not made: {why}",
              file=sys.stderr)
        return NOT_FULFILLED
    return 0


def _backend(args, data, split):
    """The backend the arguments ask for; options of the other backend are an error."""
    if args.backend == "local":
        given = [f"--{k.replace('_', '-')}" for k in ("model", "route", "max_images", "max_cost",
                                                      "usd_per_image", "base_url")
                 if getattr(args, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --backend openai only")
        from ..synthetic.diffusion import LocalDiffusion, generator_path

        path = generator_path(data, split, args.real_frac, args.generator, leaky=args.leaky,
                              allow_unfinished=args.allow_unfinished)
        return LocalDiffusion(path, strength=args.strength, guidance_scale=args.guidance,
                              device=args.device, allow_unfinished=args.allow_unfinished,
                              sample_seed=args.generator)
    if args.strength is not None or args.guidance is not None or args.leaky \
            or args.allow_unfinished or args.generator != 0:
        raise ValueError("--strength, --guidance, --generator, --leaky and --allow-unfinished "
                         "apply to --backend local only")
    from ..synthetic.base import get_backend

    overrides = {k: getattr(args, k) for k in ("model", "route", "max_images", "max_cost",
                                               "usd_per_image") if getattr(args, k) is not None}
    return get_backend("openai", base_url=args.base_url, **overrides)


def run_sweep(args) -> int:
    from ..splits import split_mri
    from ..synthetic.quality import strength_sweep

    strengths = comma_numbers(args.strengths, "--strengths", "0.4,0.6,0.8")
    scales = None if args.guidance is None else comma_numbers(args.guidance, "--guidance", "1,2,4")
    checked_seed(args.seed)
    checked_fraction(args.real_frac)
    checked_start(args, args.out)
    data = loaded(args)
    result = strength_sweep(data, split_mri(data, args.split), args.real_frac, args.generator,
                            strengths,
                            max_sources=args.max_sources, seed=args.seed, device=args.device,
                            progress=not args.json, guidance_scales=scales)
    if stamped_and_saved(args, result):
        return 0
    names = list(result["classifier_real_val"])
    print(f"generator {result['generator']}: {result['n_sources']} sources "
          f"{result['sources_per_class']}; chance {result['chance']:.2f}")
    print(f"{'guidance':>8} {'strength':>8} {'balanced':>9} "
          + " ".join(f"{n[:12]:>12}" for n in names) + f" {'grey bg':>8} {'rms to src':>10}")
    for split, note in (("val", "the classifier on real validation slices: the ceiling"),
                        ("test", "real test slices, information only: chooses nothing")):
        print(f"{'real':>8} {split:>8} "
              f"{result[f'classifier_real_{split}_balanced']:>9.3f} "
              + " ".join(f"{result[f'classifier_real_{split}'][n]:>12.3f}" for n in names)
              + f" {'':>8} {'':>10}   ({note})")
    for row in result["strengths"]:
        print(f"{row['guidance_scale']:>8g} {row['strength']:>8.2f} "
              f"{row['balanced_fidelity']:>9.3f} "
              + " ".join(f"{row['fidelity'][n]:>12.3f}" for n in names)
              + f" {row['background_grey']:>8.1f} {row['rms_to_source']:>10.1f}")
    print(result["guidance_note"])
    return 0


def run_shortcut(args) -> int:
    from ..data import load_mri
    from ..splits import split_mri
    from ..synthetic.quality import generator_shortcut_check

    overrides = {k: getattr(args, k) for k in ("max_sources", "folds")
                 if getattr(args, k) is not None}
    data = load_mri(args.source)
    result = generator_shortcut_check(data, split_mri(data, args.split), args.real_frac,
                                      args.generator,
                                      seed=args.seed, device=args.device,
                                      progress=not args.json, **overrides)
    if stamped_and_saved(args, result):
        return 0
    print(f"generator {result['generator']}: {result['n_sources']} sources, "
          f"{result['folds']} folds by {result['folds_by']}, {result['epochs']} epochs")
    print(f"{'':>20} {'balanced':>9} {'real':>6} {'synthetic':>9} {'coin <':>7} {'sources':>7}")
    for name, row in {"all": result, **result["per_class"]}.items():
        print(f"{name:>20} {row['accuracy']:>9.3f} {row['real']:>6.3f} "
              f"{row['synthetic']:>9.3f} {row['chance_upper']:>7.3f} "
              f"{row['n_sources']:>7}  {row['verdict']}")
    print(result["reading"])
    return 0


def stamped_and_saved(args, result: dict) -> bool:
    """Stamp ``result`` with the preset, split and provenance, write it to ``--out``, and
    print it with ``--json``; whether it was printed (then no table follows)."""
    from pathlib import Path

    from ..paths import atomic_write_bytes, preset_name
    from ..provenance import provenance

    result.update(preset=preset_name(), split=args.split, provenance=provenance(args.device))
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(result, indent=2).encode() + b"\n")
    if args.json:
        print(json.dumps(result, indent=2))
    return args.json


def comma_numbers(text: str, flag: str, example: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: give numbers separated by commas, "
                         f"e.g. {example}") from None
