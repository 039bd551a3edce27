"""The ``kfc-compile`` command. Subcommands: ``demo`` and ``zoo`` (register more in ``build_parser``).

The tools are imported at module level: running this module imports the ``kfc_compile`` package (and so torch)
first anyway, and the tools add little on top (torchvision, matplotlib and the demo's datasets are imported only
when a command uses them), so ``kfc-compile --help`` costs what ``import kfc_compile`` costs.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable, Sequence

import torch

from kfc_compile.tools import zoo
from kfc_compile.tools.demo import run_demo
from kfc_compile.tools.demo.data import TASKS, DemoError
from kfc_compile.tools.demo.models import MODELS
from kfc_compile.tools.demo.train import GRIDS, KFC_OPTIONS, OPTIMIZERS, TASK_SETTINGS

PROG = "kfc-compile"


def _number(kind: type, what: str, ok: Callable[[object], bool]) -> Callable[[str], object]:
    """An argparse ``type``: parse ``s`` as ``kind`` and accept it when ``ok(value)``, else say what was expected."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_nonneg_int = _number(int, "an integer >= 0", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: 0 < v < float("inf"))


def _lr_list(s: str) -> tuple[float, ...]:
    parts = [p for p in s.replace(" ", "").split(",") if p]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated learning rates, e.g. 0.3,0.1,0.03")
    return tuple(_positive_float(p) for p in parts)


def _optimizer_list(s: str) -> tuple[str, ...]:
    names = tuple(p for p in s.replace(" ", "").split(",") if p)
    bad = [n for n in names if n not in OPTIMIZERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(OPTIMIZERS)}, got {s!r}")
    return names


def _add_demo(sub) -> None:
    defaults = ", ".join(f"{t}: {s.steps} steps, target {s.target:g}" for t, s in TASK_SETTINGS.items())
    p = sub.add_parser(
        "demo", help="KFC-pre vs tuned SGD+momentum and Adam on a small task; table + demo.png",
        description="Train a small net with KFC-pre, SGD with momentum 0.9 and Adam, each with its learning rate "
                    "picked from a small grid by short runs, then once more with the picked rate. Prints steps "
                    "and seconds to a target training loss and the final test accuracy, and writes a plot of the "
                    f"training loss against steps and seconds. Task defaults: {defaults}. Nothing is downloaded.")
    p.add_argument("--task", choices=TASKS, default="digits",
                   help="digits: scikit-learn's bundled 8x8 digits; mnist1d: generated locally by the mnist1d "
                        "package; mnist1d_ae: its signals for the deep autoencoder (MSE); cifar10: torchvision's "
                        "CIFAR-10 from --data-dir (default: %(default)s)")
    p.add_argument("--data-dir", metavar="DIR", help="directory holding cifar-10-batches-py/ (for --task cifar10)")
    p.add_argument("--model", choices=MODELS, default="auto",
                   help="auto: convnet for digits/mnist1d, paper for cifar10; convnet: small 2-D/1-D conv net; "
                        "mlp; paper: the KFC paper's CIFAR-10 net; resnet18: torchvision's (3x32x32 only)")
    p.add_argument("--steps", type=_positive_int, help="training steps of each final run (task default)")
    p.add_argument("--tune-steps", type=_positive_int, help="step budget of each tuning run (default: --steps; "
                                                              "a tuning run stops at the target)")
    p.add_argument("--batch-size", type=_positive_int, help="mini-batch size for every optimizer (default 128)")
    p.add_argument("--target", type=_positive_float, help="target training loss (task default)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="initialisation and batch-order seed (default 0)")
    p.add_argument("--out", default="demo.png", metavar="PNG", help="plot path (default: %(default)s); '' for none")
    p.add_argument("--optimizers", type=_optimizer_list, default=("kfc", "sgd", "adam"), metavar="LIST",
                   help="comma-separated subset of kfc,sgd,adam (default: all)")
    for o, name in (("kfc", "KFC-pre"), ("sgd", "SGD"), ("adam", "Adam")):
        p.add_argument(f"--lr-{o}", type=_lr_list, metavar="LRS",
                       help=f"{name} learning-rate grid, comma-separated (default: {','.join(map(str, GRIDS[o]))});"
                            " one value skips tuning")
    p.add_argument("--stats-every", type=_positive_int,
                   help=f"KFC statistics period (default {KFC_OPTIONS['stats_every']}; the paper set the periods "
                        "for runtime only)")
    p.add_argument("--inverse-every", type=_positive_int,
                   help=f"KFC inverse period (default {KFC_OPTIONS['inverse_every']})")
    p.add_argument("--threads", type=_nonneg_int, default=None,
                   help="torch intra-op threads (default: 1 for digits/mnist1d(_ae), whose tiny layers lose time to "
                        "threading; torch's default otherwise; 0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log every run")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    threads = args.threads if args.threads is not None else (1 if args.task in ("digits", "mnist1d", "mnist1d_ae")
                                                             else 0)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _demo(args)
    finally:
        torch.set_num_threads(before)  # main() may be called from Python (tests, notebooks)


def _demo(args: argparse.Namespace) -> int:
    grids = {o: getattr(args, f"lr_{o}") for o in ("kfc", "sgd", "adam") if getattr(args, f"lr_{o}")}
    kfc_options = {k: v for k, v in (("stats_every", args.stats_every), ("inverse_every", args.inverse_every))
                   if v is not None}
    res = run_demo(args.task, args.model, steps=args.steps, batch_size=args.batch_size, target=args.target,
                   seed=args.seed, optimizers=args.optimizers, grids=grids, tune_steps=args.tune_steps,
                   data_dir=args.data_dir, kfc_options=kfc_options, out=args.out or None,
                   progress=not args.no_progress)
    print(res.table())
    if res.plot:
        print(f"wrote {res.plot}")
    return 0


def _name_list(s: str) -> tuple[str, ...]:
    names = tuple(p for p in s.replace(" ", "").split(",") if p)
    if not names:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated model names, got {s!r}")
    return names


def _family_list(s: str) -> tuple[str, ...]:
    names = tuple(p for p in s.replace(" ", "").split(",") if p)
    known = zoo.FAMILIES + zoo.hf_models.FAMILIES
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(zoo.FAMILIES)} "
                                         f"(torchvision) or {','.join(zoo.hf_models.FAMILIES)} (hf), got {s!r}")
    return names


def _add_zoo(sub) -> None:
    p = sub.add_parser(
        "zoo", help="transform + a few KFC steps on every torchvision model, timm family or HF architecture (or a "
                    "list); zoo.md + zoo.json",
        description="For each model (random init, nothing downloaded): find an input size it "
                    "accepts, transform it, run --steps KFC steps on one synthetic batch, time steady-state KFC "
                    "steps against SGD steps, and record tracing (ok / partial with black boxes / failed), layers "
                    "by kind, coverage, uncovered parameters by reason, loss before/after, step-time ratio and factor "
                    "memory. Detection models are transformed and reported only. A failing model never stops "
                    "the sweep. Writes zoo.md and zoo.json to --out after every model. --source timm runs the "
                    "smallest model of every timm family (the leading letters of its name; --all: every name), "
                    "--source hf the project's list of small HF configs; both add the share of conv/linear "
                    "parameter elements under KFC, tied weights and the front end to every row.")
    p.add_argument("--source", choices=("torchvision", "timm", "hf"), default="torchvision",
                   help="where the models come from (default: %(default)s)")
    p.add_argument("--models", type=_name_list, metavar="all|NAME,...",
                   help="model names of --source (default: torchvision: every model of --family; timm: the smallest "
                        "model of every family; hf: every architecture of --family)")
    p.add_argument("--all", action="store_true", help="every model of --source (timm: every name timm lists)")
    p.add_argument("--family", type=_family_list, metavar="LIST",
                   help="torchvision: a comma-separated subset of classification,video,segmentation,detection "
                        "(default: classification); hf: of causal-lm,encoder,encoder-decoder,vision (default: all); "
                        "used when --models is not given or is 'all'")
    p.add_argument("--detail", action="store_true",
                   help="add the conv/linear share, tied weights, front end and KFC warnings to every row (always "
                        "on for timm and hf)")
    p.add_argument("--compiled", action="store_true",
                   help="also measure the coverage under torch.compile(model, backend='kfc') on a fresh build (one "
                        "training forward and backward; implies --detail)")
    p.add_argument("--steps", type=_positive_int, default=2, help="KFC steps per model (default: %(default)s)")
    p.add_argument("--resolution", type=_positive_int, default=32,
                   help="smallest input size to try; models with a larger minimum use theirs (default: %(default)s)")
    p.add_argument("--batch", type=_positive_int, default=8,
                   help="synthetic batch size; below ~4, train-mode BatchNorm on the 1x1 maps of a 32x32 input "
                        "normalises over 2 values (a near sign function: loss changes are noise) "
                        "(default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=0.003,
                   help="KFC and SGD learning rate (default: %(default)s)")
    p.add_argument("--damping", type=_positive_float, default=0.1, help="KFC damping (default: %(default)s)")
    p.add_argument("--max-factor-dim", type=_nonneg_int, default=zoo.MAX_FACTOR_DIM, metavar="D",
                   help="kc.KFC's max_factor_dim: factors wider than D are kept as diagonal blocks of at most D (fast "
                        "inverses of wide layers on a CPU); 0: always dense (default: %(default)s)")
    p.add_argument("--timing-steps", type=_nonneg_int, default=3,
                   help="steady-state KFC steps (after the optimizer's 3 inverse warm-up steps) and SGD steps (after "
                        "one warm-up step) whose medians give the step-time ratio; 0: no timing (default: "
                        "%(default)s)")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="SECONDS",
                   help="per-model wall-clock limit: each model runs in a worker process and one over the "
                        "limit is stopped and recorded with what it measured so far (default: no limit)")
    p.add_argument("--out", default="zoo-out", metavar="DIR", help="output directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of the models already in --out/zoo.json (an interrupted sweep) and run the "
                        "others")
    p.add_argument("--threads", type=_nonneg_int, default=0,
                   help="torch intra-op threads, also in the --time-limit workers (0 = torch's default; on a machine "
                        "shared with other jobs use 1: oversubscribed OpenMP threads slow small ops by 10-50x)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_zoo)


def _zoo_models(args: argparse.Namespace) -> list:
    """The sweep items of ``args`` (names for torchvision, cases for timm and hf); ValueError for a bad choice."""
    every = args.all or args.models == ("all",)
    names = list(args.models) if args.models and not every else None
    families = args.family
    if args.source == "torchvision":
        fams = families or ("classification",)
        if set(fams) - set(zoo.FAMILIES):
            raise ValueError(f"--family {','.join(fams)}: torchvision families are {','.join(zoo.FAMILIES)}")
        return names or zoo.model_names(zoo.FAMILIES if args.all and not families else fams)
    if args.source == "hf":
        if families and set(families) - set(zoo.hf_models.FAMILIES):
            raise ValueError(f"--family {','.join(families)}: hf families are {','.join(zoo.hf_models.FAMILIES)}")
        unknown = [n for n in names or () if n not in zoo.hf_models.BY_NAME]
        if unknown:
            raise ValueError(f"unknown hf architectures {unknown}: expected some of {list(zoo.hf_models.BY_NAME)}")
        return zoo.hf_models.cases(names or [a.name for a in zoo.hf_models.ARCHITECTURES
                                             if not families or a.family in families])
    if families:
        raise ValueError("--family is for --source torchvision or hf (timm families: the default sweep)")
    return zoo.timm_models.cases(names, args.resolution, all_models=every)


def _cmd_zoo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        models = _zoo_models(args)
    except ValueError as e:
        print(f"{PROG} zoo: error: {e}", file=sys.stderr)
        return 2
    command = "kfc-compile " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["zoo"] else None
    detail = args.detail or args.compiled or args.source != "torchvision"
    rows = zoo.run(models, steps=args.steps, resolution=args.resolution, batch=args.batch, out=args.out,
                   lr=args.lr, damping=args.damping, progress=not args.no_progress, command=command,
                   timing_steps=args.timing_steps, time_limit=args.time_limit,
                   max_factor_dim=args.max_factor_dim or None, detail=detail, compiled=args.compiled,
                   source=args.source, resume=args.resume)
    t = zoo.totals(rows)
    print(f"{t['models']} models: ok {t['ok']}, partial {t['partial']}, failed {t['failed']}; "
          f"wrote {args.out}/zoo.md and {args.out}/zoo.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``kfc-compile`` argument parser, with its ``demo`` and ``zoo`` subcommands."""
    parser = argparse.ArgumentParser(prog=PROG, description="KFC / K-FAC natural-gradient training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_demo(sub)
    _add_zoo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kfc-compile`` console script; returns the exit status (2 for bad options/data)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # torch's own forward-mode AD (KFC's clipping) scripts its decompositions on first use and warns about it
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    try:
        return args.func(args)
    except DemoError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
