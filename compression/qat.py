"""Quantization-aware fine-tuning (NNCF), the last resort when post-training INT8 fails the fidelity gate.

The objective is fidelity, not accuracy: the fake-quantized copy is trained to reproduce the FP32 model's
logits (KL at a temperature) and class activation maps on unlabelled real photos, so no labels are needed
and the gate's question ("does INT8 grade like FP32?") is what is optimised.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.contract import REFERABLE_MIN_GRADE

from .errors import QuantizationConfigError

log = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class QATConfig:
    """How long and how gently to fine-tune the fake-quantized model.

    Args:
        steps (`int`, defaults to 300): optimiser steps; 0 disables QAT.
        batch_size (`int`, defaults to 16).
        lr (`float`, defaults to 1e-5): small, so weights move only as far as quantization needs.
        temperature (`float`, defaults to 2.0): softens logits for the KL term.
        cam_weight (`float`, defaults to 1.0): weight of the normalised-CAM MSE term.
        margin_weight (`float`, defaults to 0.0): weight of the margin-aware referral term: the squared difference of
            the referable log-odds, weighted per photo by how close FP32's referable probability is to
            ``referral_threshold`` (the referral decisions the gate judges flip there); 0 disables it.
        referral_threshold (`float`, optional): the FP32 operating point's threshold on P(grade >= 2).
        referral_temperature (`float`, defaults to 1.0): the operating point's softmax temperature.
        dme_threshold (`float`, optional): a DME head's operating-point threshold on P(DME); with ``margin_weight``
            the DME log-odds get the same margin-aware term around it (the gate judges DR-or-DME referral and DME
            agreement). None: no margin term for the DME head (it is still distilled towards FP32).
        dme_temperature (`float`, defaults to 1.0): the DME operating point's sigmoid temperature.
        schedule (`str`, defaults to ``"constant"``): ``"constant"`` keeps ``lr``; ``"cosine"`` decays it to 0 over
            ``steps``, the usual choice for long schedules (the weights settle instead of hopping between grid points).
        seed (`int`, defaults to 0).
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-5
    temperature: float = 2.0
    cam_weight: float = 1.0
    margin_weight: float = 0.0
    referral_threshold: float | None = None
    referral_temperature: float = 1.0
    dme_threshold: float | None = None
    dme_temperature: float = 1.0
    schedule: str = "constant"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.temperature <= 0 or self.cam_weight < 0:
            raise QuantizationConfigError(f"invalid QATConfig {self}: steps >= 0, batch_size >= 1, lr > 0, temperature > 0, "
                              "cam_weight >= 0")
        if self.margin_weight < 0 or (self.margin_weight > 0 and not 0 < (self.referral_threshold or 0) < 1):
            raise QuantizationConfigError(f"QATConfig.margin_weight {self.margin_weight} needs a referral_threshold in "
                                          f"(0, 1), got {self.referral_threshold!r}; pass the operating point's threshold")
        if self.schedule not in LR_SCHEDULES:
            raise QuantizationConfigError(f"QATConfig.schedule must be one of {LR_SCHEDULES}, got {self.schedule!r}")
        if (self.dme_threshold is not None and not 0 < self.dme_threshold < 1) or self.dme_temperature <= 0:
            raise QuantizationConfigError(f"QATConfig.dme_threshold must be in (0, 1) and dme_temperature > 0, got "
                                          f"{self.dme_threshold!r} and {self.dme_temperature!r}; pass the DME "
                                          "operating point's threshold and temperature")

    def holding_margins(self, weight: float, point, dme_point=None) -> QATConfig:
        """This config with the margin-aware term at ``weight`` around the operating point the gate judges referrals
        at (``point``: an ``OperatingPoint``); a DME head's point (``dme_point``) holds its DME margin too, since the
        gate judges DR-or-DME referral."""
        dme = {"dme_threshold": dme_point.threshold, "dme_temperature": dme_point.temperature} if dme_point else {}
        return replace(self, margin_weight=weight, referral_threshold=point.threshold,
                       referral_temperature=point.temperature, **dme)


def _ort_integer_kernels() -> dict:
    """``nncf.quantize`` options for a graph ONNX Runtime runs as integer kernels. NNCF's defaults target OpenVINO:
    per-channel activation scales at depthwise inputs, and int8 for signed activations beside uint8 for the rest.
    ORT fuses a convolution only with one scale per activation tensor and the same integer type in and out, so
    Lite0's QAT graph ran 12 of its 50 convolutions as integers and 2.4x slower than FP32. Asymmetric (uint8)
    per-tensor activations, symmetric per-channel weights (the ``mixed`` preset: ORT's own U8S8 layout) fuse all
    49 of the backbone's (docs/studies/qat_schedule.md)."""
    import nncf
    from nncf.quantization.advanced_parameters import QuantizationParameters

    per_tensor = QuantizationParameters(per_channel=False)
    return {"preset": nncf.QuantizationPreset.MIXED,
            "advanced_parameters": nncf.AdvancedQuantizationParameters(activations_quantization_params=per_tensor)}


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution into that convolution (in place).

    Without this, exported QAT graphs keep ``Conv -> BatchNormalization`` between the quantize/dequantize
    pairs and ONNX Runtime cannot fuse them into integer convolutions. timm's ``BatchNormAct2d`` keeps its
    activation: the module is replaced by that activation alone.
    """
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
            with torch.no_grad():
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias.detach())
            tail = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*tail) if tail else nn.Identity())
    return model


def _centred_unit_cams(cam: torch.Tensor) -> torch.Tensor:
    """Each CAM map (N x K x H x W) minus its mean, scaled to unit L2 norm: compares shapes, not offsets."""
    flat = cam.flatten(2)
    flat = flat - flat.mean(-1, keepdim=True)
    return flat / (flat.norm(dim=-1, keepdim=True) + 1e-6)


def fidelity_qat(export_module: nn.Module, calib: np.ndarray, train_images: np.ndarray, cfg: QATConfig = QATConfig(),
                 progress: bool = True, on_step: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Fake-quantize ``export_module`` (inputs -> (logits, cam[, dme_logit, dme_cam])) with NNCF, calibrated on ``calib``, then
    fine-tune it towards the FP32 outputs on ``train_images`` (N x C x S x S, normalised).

    ``on_step(step, fake_quantized)`` runs before each step, e.g. to watch a schedule (``studies.qat_schedule``).
    Returns a stripped native-torch module that ``torch.onnx.export(dynamo=False)`` writes as QDQ ONNX.
    """
    # NNCF compiles its fake-quantize kernels on first use and gives up after 60 s by default, which a busy
    # 2-core machine (CI running the test suite) can exceed.
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "600")
    import nncf

    check_qat_inputs(calib, train_images)
    student = fold_batch_norms(copy.deepcopy(export_module).eval())
    dataset = nncf.Dataset([torch.from_numpy(calib[i:i + 1]).float() for i in range(len(calib))])
    quantized = nncf.quantize(student, dataset, subset_size=len(calib), **_ort_integer_kernels())
    # eval mode throughout: no dropout, and with BN folded there are no batch statistics to update.
    quantized.eval()
    watch = None if on_step is None else (lambda step: on_step(step, quantized))
    fine_tune_towards(export_module, quantized, train_images, cfg, progress, on_step=watch)
    example = torch.from_numpy(calib[:1]).float()
    return nncf.strip(quantized, do_copy=True, strip_format=nncf.StripFormat.NATIVE, example_input=example).eval()


def check_qat_inputs(calib: np.ndarray, train_images: np.ndarray) -> None:
    if len(calib) == 0 or len(train_images) == 0:
        raise QuantizationConfigError("QAT needs calibration images (--calib's calib split) and unlabelled training images "
                          "(its train split, --tuning-images > 0)")


def referable_log_odds(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log P(grade >= 2) - log P(grade < 2) at the operating point's temperature, per photo."""
    log_p = F.log_softmax(logits / temperature, 1)
    return torch.logsumexp(log_p[:, REFERABLE_MIN_GRADE:], 1) - torch.logsumexp(log_p[:, :REFERABLE_MIN_GRADE], 1)


def _margin_weighted(odds: torch.Tensor, ref_odds: torch.Tensor, threshold: float) -> torch.Tensor:
    """Squared log-odds difference, weighted 1 + 9 exp(-|FP32 log-odds - the threshold's|) per photo."""
    threshold = torch.tensor(float(threshold))
    threshold_odds = torch.log(threshold) - torch.log1p(-threshold)
    weights = 1 + 9 * torch.exp(-(ref_odds - threshold_odds).abs())
    return (weights * (odds - ref_odds) ** 2).mean()


def margin_aware_referral_loss(logits: torch.Tensor, ref_logits: torch.Tensor, cfg: QATConfig) -> torch.Tensor:
    """Squared difference of the referable log-odds, weighted towards photos FP32 places near the threshold.

    A referral flips only where the quantized log-odds cross the threshold's, so photos whose FP32 probability is
    close to it matter most: weight 1 + 9 exp(-|logit(p) - logit(threshold)|) puts up to 10x more on them.
    """
    return _margin_weighted(referable_log_odds(logits, cfg.referral_temperature),
                            referable_log_odds(ref_logits, cfg.referral_temperature), cfg.referral_threshold)


def dme_fidelity_loss(outputs: tuple[torch.Tensor, ...], ref_outputs: tuple[torch.Tensor, ...],
                      cfg: QATConfig) -> torch.Tensor:
    """The DME head's part of the objective (``ExportModule`` outputs 2 and 3: dme_logit, dme_cam), as for the grade
    head: binary KL of the DME logit at ``cfg.temperature``, ``cfg.cam_weight`` x the normalised DME-CAM MSE, and,
    with ``cfg.margin_weight`` and ``cfg.dme_threshold``, the margin-aware term on the DME log-odds."""
    dme, dme_cam, ref_dme, ref_cam = outputs[2], outputs[3], ref_outputs[2], ref_outputs[3]
    t = cfg.temperature
    p = torch.sigmoid(ref_dme / t)
    kl = (p * (F.logsigmoid(ref_dme / t) - F.logsigmoid(dme / t))
          + (1 - p) * (F.logsigmoid(-ref_dme / t) - F.logsigmoid(-dme / t))).mean() * t * t
    cam_loss = F.mse_loss(_centred_unit_cams(dme_cam), _centred_unit_cams(ref_cam)) * dme_cam.shape[-1] * dme_cam.shape[-2]
    loss = kl + cfg.cam_weight * cam_loss
    if cfg.margin_weight > 0 and cfg.dme_threshold is not None:
        loss = loss + cfg.margin_weight * _margin_weighted(dme.reshape(-1) / cfg.dme_temperature,
                                                           ref_dme.reshape(-1) / cfg.dme_temperature, cfg.dme_threshold)
    return loss


def fine_tune_towards(reference: nn.Module, quantized: nn.Module, train_images: np.ndarray, cfg: QATConfig,
                      progress: bool = True, on_step=None) -> None:
    """Train ``quantized`` (fake-quantized, inputs -> (logits, cam[, dme_logit, dme_cam]) like ``ExportModule``) to
    reproduce ``reference``'s FP32 outputs.

    Loss: KL between the logits at ``cfg.temperature`` plus ``cfg.cam_weight`` x MSE between normalised CAMs, plus
    ``cfg.margin_weight`` x the margin-aware referral term (``margin_aware_referral_loss``); a DME head adds
    ``dme_fidelity_loss`` (the gate judges its decisions too).
    ``on_step(step)`` runs before each step (PT2E freezes its observers half way through).
    """
    reference = copy.deepcopy(reference).eval()
    optimizer = torch.optim.Adam([p for p in quantized.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.steps, 1))
                 if cfg.schedule == "cosine" else None)
    generator = np.random.default_rng(cfg.seed)
    t = cfg.temperature
    from rich.progress import Progress

    with Progress(disable=not progress) as bar:
        task = bar.add_task("quantization-aware fine-tuning", total=cfg.steps)
        for step in range(cfg.steps):
            if on_step is not None:
                on_step(step)
            rows = generator.choice(len(train_images), min(cfg.batch_size, len(train_images)), replace=False)
            x = torch.from_numpy(train_images[rows]).float()
            # Fundus photos have no canonical orientation: flips/rotations widen the few images QAT sees.
            x = torch.rot90(x, int(generator.integers(4)), dims=(2, 3))
            if generator.random() < 0.5:
                x = x.flip(3)
            with torch.no_grad():
                ref_outputs = reference(x)
            outputs = quantized(x)
            (ref_logits, ref_cam), (logits, cam) = ref_outputs[:2], outputs[:2]
            kl = F.kl_div(F.log_softmax(logits / t, 1), F.softmax(ref_logits / t, 1), reduction="batchmean") * t * t
            cam_loss = F.mse_loss(_centred_unit_cams(cam), _centred_unit_cams(ref_cam)) * cam.shape[-1] * cam.shape[-2]
            loss = kl + cfg.cam_weight * cam_loss
            if cfg.margin_weight > 0:
                loss = loss + cfg.margin_weight * margin_aware_referral_loss(logits, ref_logits, cfg)
            if len(outputs) > 2:
                loss = loss + dme_fidelity_loss(outputs, ref_outputs, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            bar.update(task, advance=1, description=f"QAT step {step + 1}/{cfg.steps} loss {loss.item():.4f}")
            if step % 50 == 0:
                log.info("QAT step %d: KL %.4f CAM %.4f", step, kl.item(), cam_loss.item())
