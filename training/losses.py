"""Losses: soft Dice (the paper's) plus binary cross-entropy, which keeps gradients alive on empty targets."""
from __future__ import annotations

from keras import ops


def soft_dice_loss(y_true, y_pred, smooth=1.0):
    """1 - soft Dice per sample, averaged over the batch."""
    axes = tuple(range(1, len(y_pred.shape)))
    inter = ops.sum(y_true * y_pred, axis=axes)
    denom = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    return ops.mean(1.0 - (2.0 * inter + smooth) / (denom + smooth))


def dice_bce_loss(y_true, y_pred, bce_weight=1.0):
    y_pred_c = ops.clip(y_pred, 1e-6, 1.0 - 1e-6)
    bce = -ops.mean(y_true * ops.log(y_pred_c) + (1.0 - y_true) * ops.log(1.0 - y_pred_c))
    return soft_dice_loss(y_true, y_pred) + bce_weight * bce


BLOBS = 6  # lesions per patch told apart by the blob term (instance_labels); more share the last id


def lesion_loss(y_true, y_pred, bce_weight=1.0, pos_weight=2.0, patch_dice=0.0, free_penalty=0.0, blob=0.0):
    """For sparse targets (lesions): Dice over the whole batch plus positively weighted cross-entropy.

    Batch-level Dice keeps lesion-free patches from rewarding an all-zero output; the cross-entropy uses
    log(p + eps) rather than a clipped p, whose gradient vanishes once the output falls below the clip
    (the first lesion model died that way: it learned to output ~1e-7 everywhere).

    patch_dice: weight of a second Dice, per patch and averaged over the patches that hold lesion voxels
    only. In the batch Dice a patch's weight is its lesion volume, so a small or faint lesion barely counts
    beside a large one; here each lesion-holding patch counts alike, and lesion-free patches still reward
    nothing.

    free_penalty: weight of a price on any response in a lesion-free patch, e/(e + 5) where e is the patch's
    summed output above 0.3 (a 5-voxel false lesion at full confidence costs 0.5, a map at the background's
    level nothing), averaged over the lesion-free patches: the cross-entropy spreads a small false lesion's
    cost over the whole batch.

    blob: weight of a Dice per lesion ("blob loss", Kofler et al. 2023), averaged over the lesions of the
    batch; y_true then holds each patch's lesions numbered 1..BLOBS (instance_labels). Each lesion's Dice
    sees the map everywhere but on the patch's other lesions, so a small faint lesion counts as much as a
    large bright one, and a false answer anywhere in the patch costs every lesion of it.
    """
    eps, smooth = 1e-6, 1.0
    if blob:
        ids, y_true = y_true, ops.minimum(y_true, 1.0)
    inter = ops.sum(y_true * y_pred)
    dice = 1.0 - (2.0 * inter + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)
    bce = -ops.mean(pos_weight * y_true * ops.log(y_pred + eps) + (1.0 - y_true) * ops.log(1.0 - y_pred + eps))
    loss = dice + bce_weight * bce
    axes = tuple(range(1, len(y_pred.shape)))
    if blob:
        total, count = 0.0, 0.0
        for k in range(1, BLOBS + 1):
            mine = ops.cast(ops.abs(ids - k) < 0.5, y_pred.dtype)
            seen = y_pred * (1.0 - (y_true - mine))  # the map, less the patch's other lesions
            size = ops.sum(mine, axis=axes)
            per = 1.0 - (2.0 * ops.sum(seen * mine, axis=axes) + smooth) / (size + ops.sum(seen, axis=axes) + smooth)
            present = ops.cast(size > 0.5, y_pred.dtype)
            total, count = total + ops.sum(per * present), count + ops.sum(present)
        loss = loss + blob * total / ops.maximum(count, 1.0)
    if not (patch_dice or free_penalty):
        return loss
    truth = ops.sum(y_true, axis=axes)
    holds = ops.cast(truth > 0.5, y_pred.dtype)
    if patch_dice:
        per = 1.0 - (2.0 * ops.sum(y_true * y_pred, axis=axes) + smooth) / (truth + ops.sum(y_pred, axis=axes) + smooth)
        loss = loss + patch_dice * ops.sum(per * holds) / ops.maximum(ops.sum(holds), 1.0)
    if free_penalty:
        excess = ops.sum(ops.relu(y_pred - 0.3), axis=axes)
        free = 1.0 - holds
        loss = loss + free_penalty * ops.sum(excess / (excess + 5.0) * free) / ops.maximum(ops.sum(free), 1.0)
    return loss


def instance_labels(y, most=BLOBS):
    """Binary lesion targets (B, ..., 1) numbered per patch 1..`most` by connected component (26-neighbours;
    components past `most` take its number), as lesion_loss(blob=...) reads them."""
    import numpy as np
    from scipy import ndimage as ndi

    out = np.zeros_like(y, dtype=np.float32)
    for i in range(y.shape[0]):
        lab, _ = ndi.label(y[i, ..., 0] > 0.5, structure=np.ones((3,) * (y.ndim - 2)))
        out[i, ..., 0] = np.minimum(lab, most)
    return out


class InstanceTargets:
    """A batch sampler whose lesion targets come numbered (instance_labels); picklable for worker processes."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __call__(self, rng):
        x, y = self.sampler(rng)
        return x, instance_labels(y)
