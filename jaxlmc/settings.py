"""The config's sections as typed, frozen dataclasses: every key with its type, its default and why (the source of
docs/config.md), the grid axes declared on FinetuneConfig's fields (GridAxis), and which sections decide a run
directory's checkpoints. jaxlmc.config reads, checks and validates them.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Callable, Literal

# The α grid's points, ends included, wherever none is given: the study, the CLI and the library alike.
DEFAULT_ALPHAS = 25
# δ of the basin verdicts (jaxlmc.decide): "one basin" only when a cell's test error barrier is shown below it.
# Frankle et al. (2020) call a pair stable to SGD noise when its test error barrier is below 2 %.
DEFAULT_MARGIN = 0.02

Schedule = Literal["constant", "cosine", "linear"]
# Registered names, checked by `validate`: jaxlmc.optimizers.OPTIMIZERS and jaxlmc.labels.LABEL_MAPS (built-ins and
# whatever a plugin module registers).
Optimizer = str
LabelMap = str
# How a member's new head starts (jaxlmc.finetuning.start_params): its seed's own random draw, one random draw shared
# by every seed (only the data order then differs between seeds: Frankle's instability analysis), zeros, or a linear
# probe fitted on the frozen starting body's features (LP-FT, Kumar et al. 2022; deterministic, so also shared).
HeadPolicy = Literal["per_seed", "shared", "zero", "probe"]


@dataclasses.dataclass(frozen=True)
class GridAxis:
    """A per-member hyperparameter of the fine-tuning grid, declared once, on the FinetuneConfig field that lists its
    values. From this declaration follow the member grid (jaxlmc.grid), the per-member constants of the training step,
    members.csv's columns, the cell keys and every table and report that shows the grid."""

    column: str  # its name in member rows, members.csv and the cell keys
    header: str  # short table header
    cell: bool = True  # members that differ in it belong to different cells (the seed does not: it is replicated)
    always_shown: bool = False  # a column in tables even when the grid does not vary it
    const: str | None = None  # the name of its per-member float32 constant in the training step, if it is one
    neutral: float | None = None  # a value that does nothing: when every member has it, the step compiles without it
    noise: bool = False  # it draws random numbers from the member's seed's "noise" key stream (consts["noise_key"])
    check: tuple[str, Callable] | None = None  # (what every value must be, the test): "be positive", v > 0
    # Filled in by jaxlmc.grid from the field the axis is declared on:
    field: str = ""  # the FinetuneConfig field
    type: type = object  # the type of one value (int, float or str)


def grid_axis(column: str, header: str, default: list, **kwargs):
    """A FinetuneConfig field holding the values of one grid axis."""
    return dataclasses.field(default_factory=lambda: list(default),
                             metadata={"grid": GridAxis(column, header, **kwargs)})


@dataclasses.dataclass(frozen=True)
class DataConfig:
    pretrain_task: str = "mnist1d"  # TFDS name or name/config
    pretrain_labels: LabelMap = "identity"  # how the pretraining task's labels are mapped (jaxlmc.data.LABEL_MAPS)
    finetune_task: str = "mnist1d/shifted"  # TFDS name or name/config
    finetune_labels: LabelMap = "mod5"  # how the fine-tuning task's labels are mapped
    ood_task: str = "mnist1d/noisy"  # "" for none; read with the fine-tuning label map
    data_dir: str = ""  # "" means $JAXLMC_DATA_DIR or ~/tensorflow_datasets
    # The splits the fine-tuning task and the OOD set are tested on, in TFDS's split syntax: "validation" where test
    # labels are hidden (GLUE), "test[:5000]" for a fixed subset of a large test set (barriers cost in proportion).
    test_split: str = "test"
    ood_split: str = "test"
    train_eval_size: int = 1000  # fixed subset of the training split used for train loss / accuracy
    validation_size: int = 500  # held out from the end of the fine-tuning train split (greedy soups, best member)
    # Class splits: keep only the examples of these original classes, relabelled 0 .. k-1 in this order ([]: all).
    # Exclusive with a label map other than "identity"; the OOD set uses finetune_classes.
    pretrain_classes: list[int] = dataclasses.field(default_factory=list)
    finetune_classes: list[int] = dataclasses.field(default_factory=list)  # its class split ([]: all)
    # Text datasets (tiny_shakespeare, imdb_reviews, …) only: bytes of context per sequence (the window read is one
    # longer, for the next-byte targets of language modelling); 0 for datasets of fixed-size inputs.
    context_length: int = 0
    # Text as tokens instead of bytes: "" (bytes), the path of a tokenizer.json, or "pretrained" (model.pretrained's
    # own). Labelled texts are right-padded (token id -1), for model kinds that read padding (gpt_neox).
    tokenizer: str = ""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "mlp"  # a registered model kind (jaxlmc.models.KINDS)
    width: int = 256  # hidden units (MLP) or channels (CNN)
    depth: int = 2  # hidden layers (MLP; 0 is logistic regression) or conv layers (CNN)
    norm: Literal["none", "layernorm"] = "none"  # LayerNorm before each hidden nonlinearity, or none
    kernel_size: int = 3  # CNN only
    heads: int = 4  # transformer only: attention heads (width must be a multiple)
    vocab_size: int = 0  # transformer only: token ids lie in [0, vocab_size)
    # "mup": the maximal-update parametrisation (Yang et al. 2021, Tensor Programs V), so that a rate means the same
    # at every width: per-layer rates by how many of a parameter's dimensions grow with the width (Adam: hidden
    # matrices at rate / m; SGD: vector-like parameters at rate · m), the head reads features / m, attention scores
    # divide by √(d·m); m = width / base_width (at base_width it is the standard parametrisation). mlp, transformer.
    parametrization: Literal["standard", "mup"] = "standard"
    base_width: int = 64  # µP's reference width
    # [model.args]: a kind's own hyperparameters, checked against its dataclass (ModelKind.args): an unknown or
    # mistyped key is an error naming it. After loading, this holds that dataclass's instance.
    args: dict = dataclasses.field(default_factory=dict, hash=False)  # (a dict cannot be hashed)
    # Released checkpoints instead of jaxlmc's own pretraining: a Hugging Face repository ("EleutherAI/pythia-14m")
    # or a local directory with one subdirectory per revision; which revisions, in finetune.pretrain_revisions.
    pretrained: str = ""


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    steps: int = 3000  # updates
    batch_size: int = 100  # examples per update
    lr: float = 1e-2  # peak learning rate
    optimizer: Optimizer = "adamw"  # AdamW (decoupled weight decay) or SGD with momentum
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # decoupled weight decay
    schedule: Schedule = "constant"  # learning-rate schedule after the warm-up
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    # The kept Orbax checkpoints: the starts fine-tuning can use.
    save_steps: list[int] = dataclasses.field(default_factory=lambda: [0, 10, 30, 100, 300, 1000, 3000])
    seed: int = 0  # the pretraining's init and data-order keys


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    # The grid: every combination of these values is a cell, and every cell has `seeds` members. The nesting order of
    # the grid (and of members.csv's columns) is the order of the fields here.
    pretrain_steps: list[int] = grid_axis("pretrain_step", "pretrain", [0, 100, 300, 3000], always_shown=True)
    lrs: list[float] = grid_axis("lr", "lr", [1e-3, 1e-2], always_shown=True, check=("be positive", lambda v: v > 0))
    weight_decays: list[float] = grid_axis("weight_decay", "wd", [0.0], const="wd",
                                           check=("be non-negative", lambda v: v >= 0))
    schedules: list[Schedule] = grid_axis("schedule", "sched", ["cosine"])
    # Per-member dropout of hidden units while fine-tuning (never at evaluation), masks from the seed's noise stream.
    dropouts: list[float] = grid_axis("dropout", "drop", [0.0], const="dropout", neutral=0.0, noise=True,
                                      check=("lie in [0, 1)", lambda v: 0 <= v < 1))
    # How each member's new head starts (HeadPolicy). Which sources of randomness vary with the seed follows from it:
    # per_seed varies the head's initialisation and the data order, the others the data order alone.
    heads: list[HeadPolicy] = grid_axis("head", "head", ["per_seed"], always_shown=True)
    # With model.pretrained: the released revisions that are the starts, named step<N> (Pythia's branches, or the
    # local subdirectories); finetune.pretrain_steps, pretrain.save_steps and pretrain.steps follow from their N.
    pretrain_revisions: list[str] = dataclasses.field(default_factory=list)
    warmup_steps: int = 0  # every member's linear warm-up from 0 to its rate
    seeds: int = dataclasses.field(default=8, metadata={"grid": GridAxis("seed", "seed", cell=False,
                                                                          always_shown=True)})  # 0 .. seeds-1
    # Added to every fine-tuning seed's key (data order, heads, scratch bodies, dropout; the shared head's too): a
    # replicate of a study with a fresh seed stream is the same config with another offset (and pretrain.seed).
    seed_offset: int = 0
    steps: int = 1000  # updates per member
    # The amount of fine-tuning as an axis: the members are also kept at these steps (each in (0, steps)), and the
    # barrier stage measures them there too. With a constant schedule the state at step t is exactly a t-step
    # fine-tuning; with a decaying one it is a point along the longer run.
    save_steps: list[int] = dataclasses.field(default_factory=list)
    batch_size: int = 100  # examples per update and member
    optimizer: Optimizer = "adamw"  # AdamW (decoupled weight decay) or SGD with momentum
    momentum: float = 0.9  # sgd only
    new_head: bool = True  # forced when the fine-tuning task has a different number of classes
    scratch: bool = False  # add a control row (pretrain_step -1): every seed from its own random initialisation
    # The linear probe (head "probe", and the start every member's barrier to the start is measured against): full-
    # batch L-BFGS on the frozen body's features of the fine-tuning training split, with an L2 penalty on its weights.
    probe_steps: int = 100
    probe_l2: float = 1e-3  # the linear probe's L2 penalty


@dataclasses.dataclass(frozen=True)
class RunConfig:
    chunk_steps: int = 100  # steps per compiled scan; metrics reach the host once per chunk
    checkpoint_every: int = 500  # steps between Orbax saves (and always at the end)
    eval_batch_size: int = 1000  # examples per evaluation batch
    max_members: int = 0  # members per compiled program; 0: all that fit in memory (then as few parts as possible)
    # Members trained together, all steps of a chunk, before the next group (jaxlmc.train.member_group_size); the
    # results do not depend on it. 0: automatic (on a CPU 2 per core when split into one device per core, as the
    # jaxlmc command does; 8 on one CPU device, fewer for a large model; all on an accelerator).
    member_group: int = 0
    # The training step's arithmetic: "float32", or "bfloat16" (the forward and backward pass on bfloat16 copies of
    # the parameters; parameters, optimiser state and every evaluation stay float32). Halves activation memory and
    # speeds up accelerators' matrix units; on a CPU it is slower.
    compute_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclasses.dataclass(frozen=True)
class BarrierConfig:
    alphas: int = DEFAULT_ALPHAS  # points on the α grid, ends included (Git Re-Basin uses 25)
    # "within" (all pairs inside each grid cell), "ring:K" (inside each cell, each member with its next K seeds,
    # cyclically: 2K pairs per member instead of seeds − 1, seeds still the units), "all", or a file of pairs (i, j).
    pairs: str = "within"
    chunk_pairs: int = 0  # pairs evaluated together; 0 picks the largest that fits memory_fraction of free memory
    memory_fraction: float = 0.5  # of free device memory the automatic chunk_pairs may use
    bootstrap: int = 1000  # seed resamples for the member-bootstrap CIs of the per-cell means (jaxlmc.stats); 0: none
    # Also the barriers after aligning member j of each pair onto member i (Git Re-Basin), columns with the suffix
    # _aligned: "weights" (weight matching; true means the same) or "activations" (activation matching on training
    # examples); false: no alignment.
    align: bool | Literal["weights", "activations"] = False
    # Also the layer-wise barriers (Adilova et al. 2024) of every member pair on the test set: one layer group (a layer,
    # or a transformer block's attention or MLP) interpolated at a time, the rest kept at member i; aligned too with
    # `align`. Costs (layer groups) × the member pairs' share of the pass.
    layerwise: bool = False
    # Also the barriers of REPAIR-renormalised interpolations (Jordan et al. 2023; jaxlmc.repair), on the aligned pairs
    # with `align`, else on the naive ones: columns with the suffix _repair. Statistics from the first
    # `repair_examples` of the fixed train-evaluation subset.
    repair: bool = False
    repair_examples: int = 500  # examples whose activation statistics REPAIR matches
    # Also each member pair's quadratic Bezier curve (Garipov et al. 2018; jaxlmc.curves): its bend trained for this
    # many Adam steps at `curve_lr` on the fine-tuning training data (batches of finetune.batch_size, t ~ U(0, 1)),
    # all pairs at once, on the aligned pairs with `align`; columns with the suffix _curve. 0: no curves.
    curve_steps: int = 0
    curve_lr: float = 1e-3  # Adam's rate when fitting a Bezier curve between two members
    # Bootstrap resamples of the evaluation examples, evaluated inside the same pass: each pair's noise floor (the
    # barrier evaluation noise alone would show, see jaxlmc.stats) comes from them. 0: no noise floors.
    noise_resamples: int = 100
    # Further registered pair measures (jaxlmc.measures, e.g. from a plugin module) computed beside the built-in ones
    # that align, repair and curve_steps switch on: columns with each one's suffix.
    measures: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    # A member is "unfit" (left out of barriers, soups and basins like a diverged one, and counted) when its train
    # accuracy is not above chance (the most frequent label's share of the train-evaluation subset) by this margin:
    # it failed to train. A member that trains but loses what pretraining gave has left the basin, not failed.
    fit_margin: float = 0.05
    # Optionally also unfit (0: off): a train accuracy below this fraction of the best one reached from the same start
    # (checkpoint and head) — a relative rule whose verdicts the report compares with the absolute one's.
    unfit_fraction: float = 0.0
    similarity_examples: int = 1000  # test examples for prediction disagreement and CKA
    # δ of the basin verdicts (jaxlmc.decide): "one basin" only when a cell's test error barrier is shown below it
    # (the upper end of its 95 % interval). The default is Frankle et al.'s (2020) "stable" criterion, 2 %.
    margin: float = DEFAULT_MARGIN
    # The study's own calibration (jaxlmc.calibration): synthetic cells per scenario, simulated with the parameters
    # of three of its cells, for its false-positive rate, power and blind spots (0: skipped).
    calibration_cells: int = 60
    # Sharpness: the top Hessian eigenvalue of the training loss of every member and of every start, by this many
    # power-iteration steps (Hessian-vector products, all members at once) on this many training examples (the first
    # of the fixed train-evaluation subset). 0 iterations: not measured.
    sharpness_iterations: int = 20
    sharpness_examples: int = 500  # training examples the Hessian-vector products use
    # A scaling study (jaxlmc.size_axes): one whole study per model size, its trends fitted across them. Empty: the
    # [model] section's own value.
    widths: list[int] = dataclasses.field(default_factory=list)  # model widths
    depths: list[int] = dataclasses.field(default_factory=list)  # model depths
    parametrizations: list[Literal["standard", "mup"]] = dataclasses.field(default_factory=list)
    # "product": every width × depth; "cross": every width at model.depth and every depth at model.width.
    size_grid: Literal["product", "cross"] = "product"
    # Refinement (jaxlmc.refine): after the grid's barriers, up to this many rounds each adding, for every start, the
    # log-midpoint of every stay → leave and trains → fails bracket wider than stats.BRACKET_FACTOR (0: none).
    refine_rounds: int = 0


@dataclasses.dataclass(frozen=True)
class PluginsConfig:
    # Python modules imported before the rest of the config is read: they register model kinds, datasets, label maps,
    # optimisers or study stages (jaxlmc.models.register_kind, jaxlmc.data.register_dataset, …) that the config then
    # names. Also `--import MODULE` on the command line.
    modules: list[str] = dataclasses.field(default_factory=list)


# The sections that decide what a run directory's checkpoints contain; the others (how often to report, how to
# measure) may change between invocations on the same directory.
TRAINING_SECTIONS = ("data", "model", "pretrain", "finetune")


@dataclasses.dataclass(frozen=True)
class Config:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    barriers: BarrierConfig = dataclasses.field(default_factory=BarrierConfig)
    study: StudyConfig = dataclasses.field(default_factory=StudyConfig)
    plugins: PluginsConfig = dataclasses.field(default_factory=PluginsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False)
