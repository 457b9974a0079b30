"""``synth bench`` and ``synth lever-quality``: what the generator's speed levers buy, and
whether one that changes the generator keeps its quality (:mod:`mrilib.synthetic.diffusion_bench`)."""
from __future__ import annotations

import json


def add_bench(actions) -> None:
    b = actions.add_parser("bench", help="training images/s and variations/s of the local "
                                         "generator at 128x128")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    b.add_argument("--train-steps", type=int, default=50, help="timed training steps")
    b.add_argument("--variations", type=int, default=1000, help="timed variations")
    b.add_argument("--channels-last", action="store_true",
                   help="train in the channels_last layout (training only; see the "
                        "generator's DEFAULTS)")
    b.add_argument("--cudnn-benchmark", action="store_true",
                   help="let cuDNN autotune its convolution algorithms (training only)")
    b.add_argument("--guidance", default=None,
                   help="comma-separated classifier-free guidance weights of the timed "
                        "variations (> 1 runs the UNet on a doubled batch); default: the "
                        "preset's, and 1,4 with --levers")
    b.add_argument("--levers", default=None,
                   help="comma-separated speed levers, each timed beside the default in this "
                        "process: compile, channels_last, autotune, batchKx (K times the "
                        "batch at the same images seen), samplebatchKx, or several joined "
                        "by + (compile+batch4x); one JSON with a row per lever")
    b.add_argument("--out", default=None,
                   help="also write the JSON to this file (checked before the timings)")
    b.set_defaults(func=run_bench)


def add_lever_quality(actions) -> None:
    from .synth import add_generator_args, add_common_args

    q = actions.add_parser("lever-quality", help="generator g made with a lever that changes it "
                                                 "(batchKx) against the default one: class "
                                                 "fidelity and nearest-real distances of the "
                                                 "same sources' variations, paired")
    add_generator_args(q, "compared")
    q.add_argument("--lever", required=True,
                   help="the lever both generators differ by, e.g. batch4x (train its "
                        "generator with `synth train --lever batch4x --seed g`)")
    q.add_argument("--max-sources", type=int, default=None,
                   help="at most N sources, in equal shares per class (default: the "
                        "preset's; thesis: generator g's whole sample)")
    q.add_argument("--seed", type=int, default=0, help="seeds the variations and the "
                                                       "bootstrap (default 0)")
    q.add_argument("--out", default=None,
                   help="also write the JSON to this file, e.g. "
                        "results/lever_quality_batch4x_x0.3_g0.json")
    q.set_defaults(func=run_lever_quality)
    add_common_args(q)


def lever_settings(lever: str | None) -> dict:
    """The generator settings ``--lever`` changes (none without it)."""
    from ..synthetic.diffusion_bench import lever_overrides

    return {} if lever is None else lever_overrides(lever)


def run_bench(args) -> int:
    from pathlib import Path

    from ..provenance import provenance
    from ..paths import atomic_write_bytes, preset_name
    from ..synthetic.diffusion_bench import bench_levers, benchmark, levers_table
    from .synth import checked_start, comma_numbers

    scales = None if args.guidance is None else comma_numbers(args.guidance, "--guidance", "1,4")
    speed = {k: True for k in ("channels_last", "cudnn_benchmark") if getattr(args, k)}
    levers = None if args.levers is None else [v.strip() for v in args.levers.split(",")
                                               if v.strip()]
    if levers is not None and speed:
        raise ValueError("--channels-last and --cudnn-benchmark apply without --levers; with "
                         "it, name them as levers (--levers channels_last,autotune)")
    checked_start(args, args.out)

    def save(result: dict) -> str:  # after each lever's row too: a cut-off run keeps them
        # no split: the slices are random
        result.update(preset=preset_name(), provenance=provenance(args.device))
        text = json.dumps(result, indent=2)
        if args.out:
            atomic_write_bytes(Path(args.out), text.encode() + b"\n")
        return text

    if levers is None:
        print(save(benchmark(args.device, n_train_steps=args.train_steps,
                             n_variations=args.variations, guidance_scales=scales, **speed)))
        return 0
    result = bench_levers(levers, args.device, n_train_steps=args.train_steps,
                          n_variations=args.variations, guidance_scales=scales or (1.0, 4.0),
                          on_row=save)
    print(levers_table(result) if args.out else save(result))
    return 0


def run_lever_quality(args) -> int:
    from ..splits import split_mri
    from ..synthetic.diffusion_bench import checked_quality_lever, lever_quality
    from .synth import checked_start, stamped_and_saved
    from .train import checked_fraction, checked_seed, loaded

    checked_seed(args.seed)
    checked_fraction(args.real_frac)
    checked_quality_lever(args.lever)  # before the data loads
    if args.max_sources is not None and args.max_sources < 1:
        raise ValueError(f"--max-sources {args.max_sources}: give 1 or more sources")
    checked_start(args, args.out)
    data = loaded(args)
    overrides = {} if args.max_sources is None else {"max_sources": args.max_sources}
    result = lever_quality(data, split_mri(data, args.split), args.real_frac, args.generator,
                           args.lever, seed=args.seed, device=args.device,
                           progress=not args.json, **overrides)
    if stamped_and_saved(args, result):
        return 0
    print(f"{args.lever} against the default, generator {args.generator} of "
          f"{args.real_frac:g}: {result['n_sources']} sources {result['sources_per_class']}, "
          f"strength {result['strength']:g}, guidance {result['guidance_scale']:g}")
    print(f"{'':>10} {'train min*':>10} {'balanced':>9} {'nearest real':>12} {'closer':>7} "
          f"{'grey bg':>8}")
    for name, row in result["generators"].items():
        print(f"{name:>10} {row['train_minutes']:>10.1f} {row['balanced_fidelity']:>9.3f} "
              f"{row['median_nearest_real']:>12.1f} {row['share_closer_than_real_min']:>7.3f} "
              f"{row['background_grey']:>8.1f}")
    for key, c in result["checks"].items():
        print(f"{key}: {c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}], floor "
              f"{c['floor']:.3f}: {c['verdict']}")
    print(f"verdict: {result['verdict']}")
    print("* wall minutes each generator trained, side by side where one job trained both "
          "(session.sh genquality): not a speed comparison; `synth bench --levers` is")
    return 0
