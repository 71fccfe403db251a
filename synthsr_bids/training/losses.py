"""Losses and validation metrics of the segmentation and regression U-Nets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SEG_INPUT_SCALE",
    "soft_dice",
    "soft_dice_loss",
    "softmax_dice_loss",
    "hard_dice",
    "RegressionLoss",
    "regression_loss",
]

#: The segmenter sees T1-like images (targets, regression outputs) times this factor, so that a
#: FreeSurfer-like T1 in units of 1/255 (white matter 110/255, mri_synthsr clips at 128/255) spans
#: roughly [0, 1] like the min-max normalised generator inputs it is trained on.
SEG_INPUT_SCALE = 255.0 / 128.0


def _class_sums(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per (sample, class): sum of p over voxels labelled k, sum of p^2, voxel count of k.

    ``probs`` ``(N, C, ...)``, ``labels`` ``(N, 1, ...)`` integer class indices. Uses a gather and
    a scatter-add instead of a one-hot tensor (C times smaller memory traffic).
    """
    n, c = probs.shape[:2]
    labels = labels.to(torch.int64)
    flat_labels = labels.reshape(n, -1)
    picked = probs.gather(1, labels).reshape(n, -1)
    inter = torch.zeros(n, c, dtype=probs.dtype, device=probs.device).scatter_add(1, flat_labels, picked)
    # Reduce over the spatial dims directly: reshaping a channels-last tensor would copy it.
    squares = (probs * probs).sum(dim=tuple(range(2, probs.dim())))
    counts = torch.zeros(n, c, dtype=probs.dtype, device=probs.device).scatter_add(
        1, flat_labels, torch.ones_like(picked))
    return inter, squares, counts


def soft_dice(probs: Tensor, labels: Tensor, *, eps: float = 1e-5) -> Tensor:
    """Soft Dice per (sample, class): ``2 sum(p y) / (sum(p^2) + sum(y^2))`` (SynthSeg's form).

    A class absent from both the labels and the prediction scores 1.
    """
    probs = probs.float()
    inter, squares, counts = _class_sums(probs, labels)
    return (2.0 * inter + eps) / (squares + counts + eps)


def soft_dice_loss(probs: Tensor, labels: Tensor) -> Tensor:
    """``1 - mean soft Dice`` over classes and samples."""
    return 1.0 - soft_dice(probs, labels).mean()


class _SoftmaxDiceLoss(torch.autograd.Function):
    """``1 - mean soft Dice(softmax(logits), labels)`` with a hand-written backward pass.

    Autograd through softmax, gather, scatter-add and squares kept ~8 full-size ``(N, C, ...)``
    temporaries alive and cost about a third of a regression step on CPU; here the forward
    keeps only the probabilities and the backward is three passes over them:

    with ``D_k = sum p_k^2 + |y = k| + eps`` and ``I_k = sum_{y = k} p_k``,
    ``dL/dp_k(v) = a_k [y(v) = k] + b_k p_k(v)``, ``a_k = -2 / (M D_k)``,
    ``b_k = 2 (2 I_k + eps) / (M D_k^2)`` (``M`` = number of (sample, class) pairs), then the
    softmax Jacobian ``dL/dz = p (g - sum_c p_c g_c)``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        # Work on a channels-last *view* (N, ..., C): for channels_last_3d logits it is contiguous,
        # so the softmax, gathers and the returned gradient need no layout copies.
        n, c = logits.shape[:2]
        probs = torch.softmax(logits.movedim(1, -1).float(), dim=-1)
        lab = labels.to(torch.int64).movedim(1, -1)  # (N, ..., 1)
        flat = lab.reshape(n, -1)
        picked = probs.gather(-1, lab)
        inter = torch.zeros(n, c, dtype=probs.dtype, device=probs.device).scatter_add(1, flat, picked.reshape(n, -1))
        counts = torch.zeros(n, c, dtype=probs.dtype, device=probs.device).scatter_add(
            1, flat, torch.ones_like(flat, dtype=probs.dtype))
        spatial = tuple(range(1, probs.dim() - 1))
        squares = (probs * probs).sum(dim=spatial)
        denom = squares + counts + eps
        dice = (2.0 * inter + eps) / denom
        ctx.save_for_backward(probs, lab, inter, denom)
        ctx.eps = eps
        ctx.logits_dtype = logits.dtype
        return 1.0 - dice.mean()

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        probs, lab, inter, denom = ctx.saved_tensors
        n, c = inter.shape
        m = float(n * c)
        a = (-2.0 / (m * denom)) * grad_out  # (N, C)
        b = (2.0 * (2.0 * inter + ctx.eps) / (m * denom * denom)) * grad_out
        view = (n,) + (1,) * (probs.dim() - 2) + (c,)
        # g = b p + a [y = k];  dL/dz = p g - p sum_c(p_c g_c)
        grad = probs * probs
        grad.mul_(b.view(view))  # b_k p_k^2
        p_y = probs.gather(-1, lab)  # (N, ..., 1)
        a_y = a.gather(1, lab.reshape(n, -1)).view_as(p_y)
        ap = a_y.mul_(p_y)
        total = grad.sum(dim=-1, keepdim=True).add_(ap)  # sum_c p_c g_c
        grad.sub_(probs * total)
        grad.scatter_add_(-1, lab, ap)
        return grad.movedim(-1, 1).to(ctx.logits_dtype), None, None


def softmax_dice_loss(logits: Tensor, labels: Tensor, *, eps: float = 1e-5) -> Tensor:
    """``soft_dice_loss(softmax(logits, dim=1), labels)``, cheaper in time and memory.

    ``logits`` ``(N, C, ...)`` (any float dtype; computed in float32), ``labels`` ``(N, 1, ...)``.
    """
    return _SoftmaxDiceLoss.apply(logits, labels, eps)


def hard_dice(prediction: Tensor, labels: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """Dice of hard label maps per class, and whether the class is present in ``labels``.

    ``prediction`` and ``labels`` are integer maps of the same shape. Returns ``(dice, present)``
    of shape ``(n_classes,)``; classes absent from both maps get Dice 1.
    """
    p = prediction.reshape(-1).to(torch.int64)
    y = labels.reshape(-1).to(torch.int64)
    both = torch.bincount(y[p == y], minlength=n_classes).double()
    n_pred = torch.bincount(p, minlength=n_classes).double()
    n_true = torch.bincount(y, minlength=n_classes).double()
    denom = n_pred + n_true
    dice = torch.where(denom > 0, 2.0 * both / denom.clamp_min(1.0), torch.ones_like(denom))
    return dice[:n_classes], (n_true > 0)[:n_classes]


@dataclass(frozen=True)
class RegressionLoss:
    """The terms of the regression loss (``total`` carries the gradient)."""

    total: Tensor
    l1: float
    dice_loss: float
    aux_dice_loss: float = 0.0


def regression_loss(
    prediction: Tensor,
    target: Tensor,
    labels: Tensor,
    *,
    segmenter: Callable[[Tensor], Tensor] | None,
    seg_weight: float,
    aux_weight: float = 0.0,
) -> RegressionLoss:
    """``L1(image, target) + seg_weight * (1 - soft Dice(segmenter(image), labels))
    [+ aux_weight * (1 - soft Dice(softmax(aux), labels))]``.

    ``prediction`` is ``(N, 1, ...)``, the image, or ``(N, 1 + C, ...)``: the image then one logit
    per segmentation label (the regressor's auxiliary segmentation outputs, used when ``aux_weight``
    is > 0). ``segmenter`` returns *logits* (a segmentation U-Net built with
    ``final_activation="linear"``; the softmax is fused into :func:`softmax_dice_loss`). It is frozen
    (its parameters need no gradient) but the loss is differentiated through it with respect to the image.
    """
    image = prediction[:, :1]
    l1 = (image.float() - target.float()).abs().mean()
    total = l1
    dice_value = aux_value = 0.0
    if segmenter is not None and seg_weight != 0:
        dice_loss = softmax_dice_loss(segmenter(image * SEG_INPUT_SCALE), labels)
        total = total + seg_weight * dice_loss
        dice_value = float(dice_loss.detach())
    if aux_weight != 0:
        if prediction.shape[1] < 2:
            raise ValueError("aux_weight > 0 needs a prediction with auxiliary segmentation channels")
        aux_loss = softmax_dice_loss(prediction[:, 1:], labels)
        total = total + aux_weight * aux_loss
        aux_value = float(aux_loss.detach())
    return RegressionLoss(total=total, l1=float(l1.detach()), dice_loss=dice_value, aux_dice_loss=aux_value)
