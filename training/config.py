"""Typed, self-validating run configs, layered defaults -> YAML -> CLI flags."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edge_runtime.contract import check_heads
from edge_runtime.errors import ConfigError, ManifestError

from .checkpoint import GRADE_HEAD_FORMS

# What each training photo goes through (transforms in training/data/device_batches.py): `basic` = orientation and
# brightness/contrast/channel jitter (the recipe every earlier run used); `phone` = basic plus the framing, optics and
# tone variation of phone ophthalmoscopes and handheld fundus cameras.
AUGMENTATIONS = ("basic", "phone")
# CAM-guided views appended to every training batch (training/cam_augment.py): crop on the CAM, erase the rest, or both.
CAM_AUGMENTS = ("off", "crop", "erase", "both")


@dataclass(frozen=True)
class TrainConfig:
    """Fine-tuning (and, with ``teacher`` set, distillation) of a registered DR model."""

    model: str = "tf_efficientnet_lite0"  # registered name (training.models.list_models())
    data: tuple[str, ...] = ()  # dataset folders (any supported layout); empty -> synthetic fundus data
    synthetic_per_grade: int = 60  # images per grade when data is empty
    synthetic_size: int = 256  # side of synthetic images in pixels
    input_size: int | None = None  # None -> the model's native resolution
    pretrained: bool = True  # ImageNet initialisation
    pretrained_file: str | None = None  # local ImageNet checkpoint for offline machines
    init_from: str | None = None  # fundus backbone.pt from `retinaedge pretrain`; replaces ImageNet/random init
    ben_graham: bool = False  # local-contrast normalisation in preprocessing
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    loss: str = "ce"  # ce | focal
    focal_gamma: float = 2.0
    # Regularisation; each default is off, so runs without these keys reproduce earlier numbers.
    label_smoothing: float = 0.0  # in [0, 0.5): share of each hard label spread evenly over the 5 grades (ce only)
    ema_decay: float | None = None  # e.g. 0.999: validate, select and save an EMA of the weights (~1/(1-d) steps)
    drop_path_rate: float = 0.0  # in [0, 1): stochastic depth of the backbone's residual blocks (timm drop_path_rate)
    class_weighted: bool = True  # inverse-frequency class weights (DR data is dominated by grade 0)
    patience: int = 5  # early stopping on validation QWK
    max_minutes: float | None = None  # wall-clock budget; training stops after the epoch that crosses it
    amp: bool = True  # mixed precision on CUDA: bf16 where the GPU supports it (no loss scaling), else fp16
    # bf16 autocast on a CPU with native bf16 matrix units (AMX or AVX512-BF16): 1.5x the photos per second of fp32
    # for Lite0 at 224 px on 2 Sapphire-Rapids cores. Off by default because it changes a CPU run's numbers; a CPU
    # without those units ignores it (emulated bf16 is slower than fp32).
    cpu_amp: bool = False
    augment: str = "basic"  # basic | phone: which augmentation recipe (AUGMENTATIONS)
    augment_on: str = "auto"  # auto | loader | device: where training photos are augmented (auto: device on CUDA)
    # Per-pixel Gaussian sensor noise, sigma drawn per photo in [0, sensor_noise] 8-bit levels, then rounded to 8 bits
    # as a device's input is (0: off). A Lite0's referrals flip under invisible noise (sigma 0.25 levels: 6 of 246 val
    # photos), as under INT8's rounding; with sensor_noise 3 its logits moved half as far, but as many referrals
    # flipped (docs/studies/2026-11-25_int8_float_islands.md), so it stays off by default.
    sensor_noise: float = 0.0
    # Stability training (Zheng et al. 2016): each step also runs a copy of the batch with Gaussian noise of
    # stability_noise 8-bit levels and adds stability_weight x KL(clean || noisy) of the grade distributions. Measured
    # like sensor_noise, with the same outcome in 6 CPU epochs. 0: off; on, a step costs two forward passes.
    stability_weight: float = 0.0
    stability_noise: float = 1.0
    # CAM-guided augmentation; off by default, so runs without these keys reproduce earlier numbers.
    cam_augment: str = "off"  # off | crop | erase | both: one extra view per photo, appended to each batch
    cam_augment_source: str = "self"  # self (the run's own CAMs) | teacher (cam_augment_teacher's)
    cam_augment_teacher: str | None = None  # checkpoint whose CAMs guide the views when cam_augment_source: teacher
    cam_augment_every: int = 2  # self: epochs between CAM refreshes (the first comes after epoch 1)
    cam_crop_scale: tuple[float, float] = (0.5, 0.8)  # crop side as a share of the image side, drawn in [low, high]
    cam_erase_floor: float = 0.3  # in [0, 1): contrast kept where the CAM is 0 (1 where it peaks)
    channels_last: bool = True  # NHWC activations on CUDA (faster convolutions on tensor cores); ignored on CPU
    compile: bool = False  # torch.compile the training model (long first epoch; pays on long GPU schedules)
    val_every: int = 1  # validate and checkpoint every N epochs (and always after the last); patience is in epochs
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 0
    seed: int = 0
    train_splits: tuple[str, ...] = ("train",)
    val_split: str = "val"
    test_split: str = "test"
    cache_dir: str = ".cache/retinaedge"
    out: str = "runs/train"
    resume: bool = False  # continue from <out>/last.pt
    referral_rule: str = "sensitivity"  # how the val photos choose the threshold: sensitivity | specificity | youden
    referral_target: float = 0.90  # the val sensitivity (or specificity) the threshold must reach
    uncertain_fraction: float = 0.05  # share of val photos nearest the threshold reported "uncertain"
    # pooled: the rule is applied to all val photos at once (the largest folder dominates); per_folder: to the mean
    # of the data folders' (cameras') val sensitivities or specificities, each folder weighted equally
    # (training.referral). The checkpoint's referral_point_photos records which photos chose it.
    referral_weighting: str = "pooled"
    referral_folders: tuple[str, ...] = ()  # folder names whose val photos choose the point; empty: every data folder
    # Share of training draws per data folder (by folder name), e.g. {eyepacs_full: 1, messidor2: 1, mexico_dme: 0.5}:
    # photos are drawn with replacement, folder f's photos each with weight w_f / (its training photos), the epoch
    # keeps its length. Empty: every photo once per epoch (each folder in proportion to its size).
    source_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    # Consistency under the fidelity gate's re-capture nuisance model (edge_runtime.nuisance; training.consistency):
    # each step also runs one nuisance draw of the batch and adds consistency_weight x the symmetric KL of the two
    # views' grade distributions (consistency_target: grade) or referable probabilities (referable), plus the DME
    # head's; consistency_margin_weight adds the squared referable log-odds difference weighted towards photos near
    # the latest val-chosen referral threshold. 0: off; on, a step costs two forward passes.
    consistency_weight: float = 0.0
    consistency_target: str = "grade"
    consistency_margin_weight: float = 0.0
    # Heads over the shared pooled features: grade (always), dme = binary diabetic macular edema, trained
    # on the folders' DME labels (layouts.read_dme) with the loss masked where a photo has none.
    heads: tuple[str, ...] = ("grade",)
    grade_head: str = "softmax"  # softmax | ordinal: one severity score, logit_k = (k+1) s + c_k (adjacent categories)
    dme_loss_weight: float = 1.0  # weight of the DME loss beside the grade loss
    dme_rule: str = "sensitivity"  # how the val photos with DME labels choose "DME present": sensitivity | specificity | youden
    dme_target: float = 0.90  # the val sensitivity (or specificity) the DME threshold must reach
    # Distillation (compression.distill); ignored when teacher is empty.
    teacher: tuple[str, ...] = ()  # teacher checkpoint(s); several = an ensemble of their calibrated outputs
    unlabelled: tuple[str, ...] = ()  # folders of extra photos the teachers label (any layout; labels ignored)
    # The calib split only sets INT8 ranges and the teacher never trained on it: honest soft labels, no lost verdicts.
    distill_on_calib: bool = True  # the data folders' calib split joins as unlabelled photos (never val/test)
    teacher_batch_size: int | None = None  # teacher forward passes; None -> 4 x batch_size (no gradients kept)
    alpha: float = 0.7  # weight of the soft-target KL term
    temperature: float = 4.0
    cam_weight: float = 0.0  # CAM-attention transfer weight (0 = off)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "synthetic_per_grade", "synthetic_size", "val_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        check_augment(self.augment)
        self._check_cam_augment()
        if self.augment_on not in ("auto", "loader", "device"):
            raise ConfigError(f"augment_on must be auto | loader | device, got {self.augment_on!r}")
        if self.grade_head not in GRADE_HEAD_FORMS:
            raise ConfigError(f"grade_head must be one of {' | '.join(GRADE_HEAD_FORMS)}, got {self.grade_head!r}")
        if self.loss not in ("ce", "focal"):
            raise ConfigError(f"loss must be 'ce' or 'focal', got {self.loss!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5) (0 = off), got {self.label_smoothing!r}")
        if self.label_smoothing and self.loss != "ce":  # focal's (1 - p_y)^gamma has no single p_y for a spread label
            raise ConfigError(f"label_smoothing applies to the cross-entropy loss only; with loss {self.loss!r} "
                              "set label_smoothing: 0 or use loss: ce")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in (0, 1), e.g. 0.999, or None for no EMA; got {self.ema_decay!r}")
        if self.stability_weight < 0 or not 0 < self.stability_noise <= 32:
            raise ConfigError(f"stability_weight must be >= 0 (0 = off) and stability_noise in (0, 32] 8-bit levels, "
                              f"got {self.stability_weight!r}, {self.stability_noise!r}")
        if not 0 <= self.sensor_noise <= 32:
            raise ConfigError(f"sensor_noise is the largest noise sigma in 8-bit levels, in [0, 32] (0 = off), got "
                              f"{self.sensor_noise!r}")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"drop_path_rate must be in [0, 1) (0 = off), got {self.drop_path_rate!r}")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr must be in (0, 1), got {self.lr!r}")
        if not 0 <= self.alpha <= 1 or self.temperature <= 0:
            raise ConfigError(f"alpha must be in [0, 1] and temperature > 0, got {self.alpha!r}, {self.temperature!r}")
        if self.referral_rule not in ("sensitivity", "specificity", "youden"):
            raise ConfigError(f"referral_rule must be sensitivity | specificity | youden, got {self.referral_rule!r}")
        if not 0 < self.referral_target < 1 or not 0 <= self.uncertain_fraction < 0.5:
            raise ConfigError(f"referral_target must be in (0, 1) and uncertain_fraction in [0, 0.5), got "
                              f"{self.referral_target!r}, {self.uncertain_fraction!r}")
        if self.input_size is not None and not 32 <= self.input_size <= 1024:
            raise ConfigError(f"input_size must be in [32, 1024], got {self.input_size!r}")
        if self.teacher_batch_size is not None and int(self.teacher_batch_size) < 1:
            raise ConfigError(f"teacher_batch_size must be >= 1 (or None for 4 x batch_size), got {self.teacher_batch_size!r}")
        if self.init_from is not None:
            if self.pretrained_file:
                raise ConfigError(f"init_from ({self.init_from}) and pretrained_file ({self.pretrained_file}) both set "
                                  "the backbone's starting weights; keep one")
            if not Path(self.init_from).is_file():
                raise ConfigError(f"init_from backbone {self.init_from} not found; write one with `retinaedge pretrain`")
        for name in ("data", "teacher", "unlabelled"):
            object.__setattr__(self, name, path_tuple(getattr(self, name), name))
        if self.unlabelled and not self.teacher:
            raise ConfigError(f"unlabelled photos {list(self.unlabelled)} need a teacher to label them: set teacher "
                              "(`retinaedge distill --teacher CKPT`) or drop unlabelled")
        object.__setattr__(self, "train_splits", tuple(self.train_splits))
        self._check_heads()
        self._check_partial_labels()

    def _check_heads(self) -> None:
        try:
            object.__setattr__(self, "heads", check_heads(self.heads))
        except ManifestError as exc:
            raise ConfigError(str(exc)) from exc
        if self.dme_loss_weight < 0:
            raise ConfigError(f"dme_loss_weight must be >= 0, got {self.dme_loss_weight!r}")
        if self.dme_rule not in ("sensitivity", "specificity", "youden"):
            raise ConfigError(f"dme_rule must be sensitivity | specificity | youden, got {self.dme_rule!r}")
        if not 0 < self.dme_target < 1:
            raise ConfigError(f"dme_target must be in (0, 1), got {self.dme_target!r}")

    def _check_partial_labels(self) -> None:
        """Multi-source keys: the referral weighting, the folders that choose the point, sampling weights and the
        nuisance-consistency term."""
        if self.referral_weighting not in ("pooled", "per_folder"):
            raise ConfigError(f"referral_weighting must be pooled | per_folder, got {self.referral_weighting!r}")
        names = [Path(d).name for d in self.data]
        object.__setattr__(self, "referral_folders", path_tuple(self.referral_folders, "referral_folders"))
        for key, given in (("referral_folders", self.referral_folders), ("source_weights", list(self.source_weights))):
            for name in given:
                if name not in names:
                    close = difflib.get_close_matches(str(name), names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise ConfigError(f"{key} names folder {name!r}, which is not one of the data folders {names}{hint}")
        if self.source_weights:
            missing = sorted(set(names) - set(self.source_weights))
            if missing:
                raise ConfigError(f"source_weights must give every data folder a weight (or be empty); missing "
                                  f"{missing}")
            try:
                weights = {str(k): float(v) for k, v in self.source_weights.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"source_weights must map folder names to numbers, got {self.source_weights!r}") from None
            if any(not w > 0 for w in weights.values()):
                raise ConfigError(f"source_weights must be > 0 (drop a folder from data instead), got {weights}")
            object.__setattr__(self, "source_weights", weights)
        if self.consistency_weight < 0 or self.consistency_margin_weight < 0:
            raise ConfigError(f"consistency_weight and consistency_margin_weight must be >= 0 (0 = off), got "
                              f"{self.consistency_weight!r}, {self.consistency_margin_weight!r}")
        if self.consistency_target not in ("grade", "referable"):
            raise ConfigError(f"consistency_target must be grade | referable, got {self.consistency_target!r}")

    @property
    def consistency(self) -> bool:
        """Whether each step runs a nuisance-perturbed copy of its batch."""
        return self.consistency_weight > 0 or self.consistency_margin_weight > 0

    def _check_cam_augment(self) -> None:
        if self.cam_augment not in CAM_AUGMENTS:
            raise ConfigError(f"cam_augment must be {' | '.join(CAM_AUGMENTS)}, got {self.cam_augment!r}")
        if self.cam_augment_source not in ("self", "teacher"):
            raise ConfigError(f"cam_augment_source must be self | teacher, got {self.cam_augment_source!r}")
        if self.cam_augment_source == "teacher" and not self.cam_augment_teacher:
            raise ConfigError("cam_augment_source: teacher needs cam_augment_teacher: PATH (a best.pt)")
        if self.cam_augment_teacher and self.cam_augment_source != "teacher":
            raise ConfigError("cam_augment_teacher is read only with cam_augment_source: teacher; set both or neither")
        if int(self.cam_augment_every) < 1:
            raise ConfigError(f"cam_augment_every must be >= 1, got {self.cam_augment_every!r}")
        try:
            low, high = (float(v) for v in self.cam_crop_scale)
        except (TypeError, ValueError):
            raise ConfigError(f"cam_crop_scale must be [low, high], got {self.cam_crop_scale!r}") from None
        if not 0.2 <= low <= high <= 1:  # below 0.2 a 4 x 4 CAM cell would fill the whole view
            raise ConfigError(f"cam_crop_scale must satisfy 0.2 <= low <= high <= 1, got {self.cam_crop_scale!r}")
        object.__setattr__(self, "cam_crop_scale", (low, high))
        if not 0 <= self.cam_erase_floor < 1:
            raise ConfigError(f"cam_erase_floor must be in [0, 1), got {self.cam_erase_floor!r}")
        # Teacher-CAM alignment compares the student's CAM with the teacher's on the *original* frame, pixel by
        # pixel; a cropped or faded view has no aligned target, so the two are not combined.
        if self.cam_augment != "off" and self.cam_weight > 0:
            raise ConfigError(f"cam_augment: {self.cam_augment} cannot be combined with cam_weight > 0 (teacher CAM "
                              "alignment needs photos in their original frame); set cam_weight: 0 or cam_augment: off")

    @property
    def teacher_batch(self) -> int:
        """Teacher forward passes keep no activations for backward, so a batch several times training's fits."""
        return self.teacher_batch_size or 4 * self.batch_size

    @property
    def backbone_init(self) -> str:
        """Where the backbone's starting weights came from, for metrics and model cards: fundus | file | imagenet | random."""
        if self.init_from:
            return "fundus"
        if self.pretrained_file:
            return "file"
        from .models import get_model_cfg  # lazy: the registry imports timm

        # Test-only models (test_dr_tiny) have no ImageNet weights and ignore `pretrained`.
        return "imagenet" if self.pretrained and get_model_cfg(self.model).role != "test" else "random"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def check_augment(name: str) -> None:
    """Refuse an augmentation recipe that does not exist (a typo would otherwise train with `basic` silently)."""
    if name not in AUGMENTATIONS:
        close = difflib.get_close_matches(str(name), AUGMENTATIONS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"augment must be {' | '.join(AUGMENTATIONS)}, got {name!r}{hint}")


def path_tuple(value: Any, name: str) -> tuple[str, ...]:
    """A YAML list, a single string or None (nothing) -> a tuple of distinct paths."""
    if value is None:
        return ()
    paths = (str(value),) if isinstance(value, (str, Path)) else tuple(str(v) for v in value)
    if any(not p.strip() for p in paths):
        raise ConfigError(f"{name} has an empty path: {list(paths)}")
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        # An ensemble member listed twice would silently count double in the average.
        raise ConfigError(f"{name} lists {repeated} more than once; list each path once")
    return paths


def check_keys(cls: type, data: dict[str, Any], source: str) -> None:
    """Reject unknown keys, suggesting close matches (typos in YAML are silent otherwise)."""
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {close}?" if close else f"; known keys: {known}"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def resolve_config(cls: type, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None):
    """Defaults -> YAML file -> explicit overrides (CLI flags; ``None`` values are dropped)."""
    values: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded).__name__}")
        check_keys(cls, loaded, str(path))
        values.update(loaded)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    check_keys(cls, overrides, "command-line flags")
    values.update(overrides)
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
