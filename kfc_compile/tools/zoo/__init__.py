"""``kfc_compile.tools.zoo``: transform and train a collection of models with KFC, one report row per model.

``run(models, steps=2, resolution=32, batch=8, out=DIR)`` takes torchvision model names (``"resnet18"``,
``"all"``, or families through :func:`model_names`), ``(name, constructor)`` pairs,
``(name, constructor, family)`` triples, or :class:`Case` objects — the timm source
(:func:`timm_models.cases`: the smallest model of every timm family, or any timm names) and the HF source
(:func:`hf_models.cases`: the project's list of small HF configs, keyword inputs, ``labels=``) — and for each model,
with random initialisation on synthetic data:

1. builds it and finds the smallest input it accepts (``resolution`` first, then larger; per-model minimums;
   ViT is built for ``resolution``; the video models that need 16 frames of 224×224 run one clip, ``MAX_BATCH``);
2. transforms it (``kc.transform``): traced fully, or partially (black boxes), or failed;
3. runs ``steps`` KFC steps (``kc.KFC``, cross-entropy on the main output; per-pixel for segmentation) on one
   fixed synthetic batch (training mode; every forward reseeds the RNG, so dropout and stochastic depth draw the
   same masks in each step and in the losses recorded before and after the steps), then keeps stepping for the
   timing:
   ``kfc_step_s`` is the median of ``timing_steps`` *steady-state* KFC steps, i.e. steps after the optimizer's
   warm-up (it recomputes every inverse at steps 1–3; statistics are taken at every step, inverses are then
   refreshed every 20 steps, which the median leaves out), and ``sgd_step_s`` the median of as many SGD
   (momentum 0.9) steps on a fresh build of the model (same seed) after one warm-up step, in the same process:
   ``step_time_ratio`` is their ratio;
4. records matched layers by kind, coverage, uncovered parameters by reason, the loss before and after, the
   step-time ratio and the bytes held by the optimizer's factors (moving averages and inverses);
5. with ``detail=True`` (the CLI's timm and hf sources) adds :data:`DETAIL_KEYS`: the share of conv/linear
   parameter elements under KFC and the conv/linear parameters it missed by reason, weights tied to embeddings
   (left out of the share), the front end (fx / dynamo) and KFC's warnings; with ``compiled=True`` also the
   coverage under ``torch.compile(model, backend="kfc")`` of a fresh build (:mod:`~kfc_compile.tools.zoo.detail`).

A model that fails never stops the sweep: its row says ``"failed"`` with the error. With ``time_limit`` (seconds)
each model runs in a worker process (forked from a fork server); one that runs over the limit is stopped and its
row keeps what was measured before (coverage after the transform, the losses after the training steps):
``"failed"`` with a ``time limit`` error if the training steps did not finish, else its status with the error
noting the unfinished timing. Detection models are transformed and reported only (their training needs target
dicts). ``run`` returns the rows and, with ``out``, writes ``zoo.json`` (``{"schema_version": 1, "models":
[...]}``, every row with exactly :data:`ROW_KEYS`, plus :data:`DETAIL_KEYS` in a detail sweep) and ``zoo.md``.

Modules: :mod:`~kfc_compile.tools.zoo.models` (torchvision names, input sizes, building),
:mod:`~kfc_compile.tools.zoo.cases` (how a model is built, fed and trained), :mod:`~kfc_compile.tools.zoo.timm_models`
and :mod:`~kfc_compile.tools.zoo.hf_models` (the timm and HF sources), :mod:`~kfc_compile.tools.zoo.detail` (the
conv/linear share, compiled coverage), :mod:`~kfc_compile.tools.zoo.measure` (one model's row),
:mod:`~kfc_compile.tools.zoo.worker` (the time-limited worker process),
:mod:`~kfc_compile.tools.zoo.sweep` (``run``) and :mod:`~kfc_compile.tools.zoo.report` (``zoo.json``, ``zoo.md``).
The core library never imports this package: ``from kfc_compile.tools import zoo``.
"""
from kfc_compile.tools.zoo import hf_models, timm_models
from kfc_compile.tools.zoo.cases import Case, image_case
from kfc_compile.tools.zoo.detail import DETAIL_KEYS, conv_linear_params, linear_share
from kfc_compile.tools.zoo.measure import MASK_SEED, MAX_FACTOR_DIM, ROW_KEYS, WARMUP_STEPS, factor_bytes, run_one
from kfc_compile.tools.zoo.models import (
    DEFAULT_RES,
    DETECTION_RES,
    FAMILIES,
    MAX_BATCH,
    MIN_RES,
    VIDEO_FRAMES,
    build,
    family_of,
    first_output,
    make_input,
    model_names,
    resolutions,
)
from kfc_compile.tools.zoo.report import SCHEMA_VERSION, cpu_name, machine, render, totals, write
from kfc_compile.tools.zoo.sweep import run
from kfc_compile.tools.zoo.worker import run_limited

__all__ = ["DEFAULT_RES", "DETAIL_KEYS", "DETECTION_RES", "FAMILIES", "MASK_SEED", "MAX_BATCH", "MAX_FACTOR_DIM",
           "MIN_RES", "ROW_KEYS", "SCHEMA_VERSION", "VIDEO_FRAMES", "WARMUP_STEPS", "Case", "build",
           "conv_linear_params", "cpu_name", "factor_bytes", "family_of", "first_output", "hf_models", "image_case",
           "linear_share", "machine", "make_input", "model_names", "render", "resolutions", "run", "run_limited",
           "run_one", "timm_models", "totals", "write"]
