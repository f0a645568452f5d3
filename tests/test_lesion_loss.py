"""The lesion loss must keep a gradient when the output has collapsed towards zero (the failure it fixes)."""
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
from cordseg.training.losses import BLOBS, dice_bce_loss, instance_labels, lesion_loss  # noqa: E402


def _grad(loss, y_true, logits):
    z = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = loss(tf.constant(y_true), tf.sigmoid(z))
    return float(value), tape.gradient(value, z).numpy()


def test_gradient_survives_a_collapsed_output():
    y = np.zeros((2, 8, 8, 8, 1), np.float32)
    y[0, 2:5, 2:5, 2:5] = 1.0
    logits = np.full(y.shape, -18.0, np.float32)  # sigmoid ~ 1.5e-8, below the old clip
    _, g_old = _grad(dice_bce_loss, y, logits)
    _, g_new = _grad(lesion_loss, y, logits)
    assert np.abs(g_old[y > 0]).max() < 1e-6  # the old loss is stuck there
    assert (g_new[y > 0] < -1e-5).all()  # the new one pushes lesion voxels up
    assert np.abs(g_new[y > 0]).min() > 100 * np.abs(g_old[y > 0]).max()


def test_perfect_prediction_scores_near_zero_and_empty_batch_is_cheap():
    y = np.zeros((2, 4, 4, 4, 1), np.float32)
    y[0, 1:3, 1:3, 1:3] = 1.0
    good = float(lesion_loss(tf.constant(y), tf.constant(np.clip(y, 1e-4, 1 - 1e-4))))
    bad = float(lesion_loss(tf.constant(y), tf.constant(np.full_like(y, 1e-4))))
    assert good < 0.01 < 0.9 < bad
    empty = np.zeros_like(y)
    assert float(lesion_loss(tf.constant(empty), tf.constant(np.full_like(y, 1e-4)))) < 0.05


def test_pos_weight_prices_missed_lesion_voxels_only():
    y = np.zeros((1, 4, 4, 4, 1), np.float32)
    y[0, 1:3, 1:3, 1:3] = 1.0
    miss = np.where(y > 0, 0.2, 1e-4).astype(np.float32)  # lesion under-called, background right
    extra = np.where(y > 0, 1 - 1e-4, 0.3).astype(np.float32)  # lesion right, background over-called

    def loss(p, w):
        return float(lesion_loss(tf.constant(y), tf.constant(p), pos_weight=w))

    assert loss(miss, 5.0) > loss(miss, 2.0) + 0.1
    assert loss(extra, 5.0) == pytest.approx(loss(extra, 2.0), abs=1e-3)


def test_patch_dice_counts_each_lesion_patch_alike_and_ignores_lesion_free_ones():
    y = np.zeros((3, 8, 8, 8, 1), np.float32)
    y[0, 1:7, 1:7, 1:7] = 1.0  # a large lesion, found
    y[1, 2:6, 2:6, 3:5] = 1.0  # a smaller one, missed; patch 2 holds none
    p = np.where(y > 0, 0.99, 1e-3).astype(np.float32)
    p[1] = 1e-3

    def loss(pred, w):
        return float(lesion_loss(tf.constant(y), tf.constant(pred), patch_dice=w))

    # the batch Dice hardly notices the missed small lesion; the patch Dice prices it as half the patches
    assert loss(p, 1.0) - loss(p, 0.0) == pytest.approx(0.5, abs=0.05)
    # a false response on the lesion-free patch changes the patch term not at all
    noisy = p.copy()
    noisy[2, 2:4, 2:4, 2:4] = 0.9
    assert (loss(noisy, 1.0) - loss(noisy, 0.0)) == pytest.approx(loss(p, 1.0) - loss(p, 0.0), abs=1e-6)
    empty, flat = tf.constant(np.zeros_like(y)), tf.constant(np.full_like(y, 1e-3))
    assert float(lesion_loss(empty, flat, patch_dice=1.0)) == pytest.approx(float(lesion_loss(empty, flat)), abs=1e-6)


def test_free_penalty_prices_a_small_false_lesion_in_a_lesion_free_patch_only():
    y = np.zeros((2, 8, 8, 8, 1), np.float32)
    y[0, 2:4, 2:4, 2:4] = 1.0
    p = np.where(y > 0, 0.9, 0.01).astype(np.float32)

    def loss(pred, w):
        return float(lesion_loss(tf.constant(y), tf.constant(pred), free_penalty=w))

    assert loss(p, 1.0) == pytest.approx(loss(p, 0.0), abs=1e-6)  # background level: no price
    false = p.copy()
    false[1, 1:3, 1:3, 1:2] = 1.0  # 4 voxels at full confidence where no lesion is
    assert loss(false, 1.0) - loss(false, 0.0) == pytest.approx(4 * 0.7 / (4 * 0.7 + 5.0), abs=1e-4)
    over = p.copy()
    over[0, 4:6, 2:4, 2:4] = 1.0  # the same excess in the lesion-holding patch is the Dice's business
    assert loss(over, 1.0) == pytest.approx(loss(over, 0.0), abs=1e-6)


def test_instance_labels_number_each_patch_s_lesions():
    y = np.zeros((2, 12, 12, 12, 1), np.float32)
    y[0, 1:3, 1:3, 1:3] = 1.0
    y[0, 3, 3, 3] = 1.0  # touches the first at a corner: the same lesion
    y[0, 8:10, 8:10, 8:10] = 1.0
    for k in range(BLOBS + 1):  # more lesions than BLOBS: the last ones share its number
        y[1, k + k % 2, 0 if k % 2 else 6, 0] = 1.0
    ids = instance_labels(y)
    assert sorted(np.unique(ids[0])) == [0, 1, 2] and ids[0, 3, 3, 3, 0] == ids[0, 1, 1, 1, 0]
    assert ids[1].max() == BLOBS and (ids[1] > 0).sum() == BLOBS + 1
    assert ((ids > 0) == (y > 0)).all()


def test_blob_term_prices_each_lesion_alike():
    y = np.zeros((1, 16, 16, 16, 1), np.float32)
    y[0, 2:8, 2:8, 2:8] = 1.0  # 216 voxels
    y[0, 12:14, 12:14, 12:14] = 1.0  # 8 voxels
    ids = instance_labels(y)
    right = np.where(y > 0, 0.99, 1e-4).astype(np.float32)
    no_small, no_big = right.copy(), right.copy()
    no_small[0, 12:14, 12:14, 12:14] = 1e-4
    no_big[0, 2:8, 2:8, 2:8] = 1e-4

    def blob(pred):  # the blob term alone
        return float(lesion_loss(tf.constant(ids), tf.constant(pred), blob=1.0)) - float(
            lesion_loss(tf.constant(y), tf.constant(pred)))

    assert blob(right) < 0.05
    # either lesion missed costs about half of the term (one of two lesions; the Dice's smoothing takes a
    # little off the small one), however small it is
    assert 0.4 < blob(no_small) < 0.55 and 0.45 < blob(no_big) < 0.55
    # while the batch Dice and cross-entropy hardly see the small one
    assert float(lesion_loss(tf.constant(y), tf.constant(no_small))) < 0.1
    # a false answer away from both lesions costs each of them
    false = right.copy()
    false[0, 12:14, 2:4, 2:4] = 0.99
    assert blob(false) > blob(right) + 0.1


@pytest.mark.parametrize("option", ["patch_dice", "free_penalty", "blob"])
def test_lesion_loss_terms_are_refused_for_other_tasks(tmp_path, option):
    from cordseg.training.train import run

    with pytest.raises(ValueError, match="lesion task"):
        run("sc", tmp_path, steps=1, **{option: 1.0})
    assert not any(tmp_path.iterdir())  # refused before anything was built or written
