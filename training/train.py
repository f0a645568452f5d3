"""Train one of cordseg's networks from synthetic data: `python -m cordseg.training.train TASK --out DIR`.

Also reachable as `cordseg train TASK ...`. Resumes from DIR/checkpoint.keras when it exists.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


CONUS_SHARE = 0.12  # --cauda-equina: share of the template's slices drawn within 50-60 mm of the conus


def default_labelmaps() -> Path:
    """../shared/data/labelmaps beside the checkout (or the working folder), else ./labelmaps."""
    from .export import shared_data_dir

    data = shared_data_dir()
    return data / "labelmaps" if data is not None else Path("labelmaps")


def _cnn2_shape(path):
    """(input channels, base filters) of a CNN2 weights file: its first convolution's kernel."""
    import h5py

    with h5py.File(path, "r") as f:
        shape = f["layers/conv3d/vars/0"].shape
    return shape[-2], shape[-1]


def load_init(model, cfg, path):
    """`path`'s weights into `model`; the weights of a narrower CNN2 (fewer input channels or filters) are
    widened so that the network starts as it was (training/networks.copy_widened)."""
    from . import tasks
    from .networks import copy_widened

    try:
        model.load_weights(str(path))
    except ValueError:
        if cfg.task == "centerline":
            raise
        channels, base = _cnn2_shape(path)
        if channels > len(cfg.channels) or base > cfg.network.get("base_filters", base):
            raise
        narrow = tasks.build_model(tasks.with_network(cfg, {"base_filters": base}, channels=cfg.channels[:channels]))
        narrow.load_weights(str(path))
        copy_widened(narrow, model)


class OptionError(ValueError):
    """Options that do not go together (or name what does not exist): the command line says so in one line."""


def run(task, out, *, steps=None, batch_size=None, learning_rate=None, labelmaps=None, seed=0, log=print,
        workers=0, max_minutes=None, network=None, init_weights=None, data=None, real_fraction=0.5,
        contrasts=None, patch_shape=None, pos_weight=None, snapshot_every=1000, lesion_style=None,
        cauda_equina=False, stop_at=None, real_backgrounds=False, real_share=0.5, sagittal_share=None,
        dwi_share=0.0, channels=None, vary_backgrounds=0.0, patch_dice=0.0, free_penalty=0.0,
        lesions_as_seen=False, blob=0.0, snap_ends=False,
        background_subjects=None, background_dirs=None):
    from . import losses, synth, tasks
    from .loop import train

    if channels and task == "centerline":
        raise OptionError("--channels is for CNN2 (sc, lesion)")
    if (patch_dice or free_penalty or blob) and task != "lesion":
        raise OptionError("--patch-dice, --free-penalty and --blob-loss are for the lesion task")
    if background_subjects:
        from .carve import BACKGROUNDS

        unknown = sorted(set(background_subjects) - set(BACKGROUNDS))
        if unknown:
            raise OptionError(f"--background-subjects: unknown {', '.join(unknown)} (known: {', '.join(BACKGROUNDS)})")
    if (real_backgrounds or background_dirs) and task != "lesion":
        raise OptionError("--real-backgrounds and --backgrounds-from are for the lesion task")
    own = []  # the user's lesion-free scans (BIDS), found before the slow set-up so that a wrong folder says so at once
    for folder in background_dirs or ():
        from .bids import find_lesion_free

        if not Path(folder).is_dir():
            raise OptionError(f"--backgrounds-from: {folder} is not a folder")
        found = find_lesion_free(folder)
        if not found:
            raise OptionError(f"--backgrounds-from: no lesion-free T2w, T2star or MTS image under {folder}/sub-*/")
        own += found
    cfg = tasks.with_network(tasks.TASKS[task], network, channels)  # a copy to adjust
    if steps:
        cfg.steps = steps
    if batch_size:
        cfg.batch_size = batch_size
    if learning_rate:
        cfg.learning_rate = learning_rate
    if lesion_style:
        cfg.lesion_style = lesion_style
    if patch_shape:  # CNN2 is fully convolutional: it may train on smaller patches than it runs on
        cfg.patch_shape = tuple(patch_shape)
    if sagittal_share is not None:
        cfg.p_sagittal = sagittal_share
    if dwi_share:
        if task != "sc":
            raise OptionError("--dwi-share is for the cord task (sc)")
        cfg.p_dwi = dwi_share
    if cauda_equina:  # the template's dural sac and nerve roots below the conus, and slices drawn around it
        cfg.p_conus = CONUS_SHARE
    anatomy = synth.load_anatomies(labelmaps or default_labelmaps(),
                                   cauda_equina=cauda_equina if cauda_equina in ("bundle", "bundles")
                                   else bool(cauda_equina))
    real = tasks.load_real(cfg, data, contrasts) if data else []
    if data:
        log(f"{len(real)} labelled real volumes from {data}; real fraction {real_fraction if real else 0}")
    sampler = tasks.Sampler(cfg, anatomy, real, real_fraction)
    if real_backgrounds or own:  # lesions carved into real lesion-free scans (training/carve.py), mixed in
        from . import carve
        from .export import shared_data_dir

        # the shared subjects by default; with the user's own scans, only those unless subjects are named too
        subjects = tuple(background_subjects or (() if own else carve.TRAINING_SUBJECTS))
        masks = Path(out) / "masks"
        backgrounds = carve.training_backgrounds(shared_data_dir(), masks, subjects) if subjects else []
        try:
            backgrounds += carve.load_backgrounds([(v.image, v.cord, v.contrast) for v in own], masks)
        except ValueError as err:  # a mask that does not fit its image
            raise OptionError(f"--backgrounds-from: {err}") from None
        names = list(subjects) + sorted({v.subject for v in own})
        log(f"{len(backgrounds)} real lesion-free backgrounds ({', '.join(names)}); real share {real_share}")
        sampler = carve.CarveSampler(sampler, backgrounds, real_share=real_share, vary=vary_backgrounds,
                                     as_seen=lesions_as_seen, snap_ends=snap_ends)
    def build():
        model = tasks.build_model(cfg)
        if init_weights:  # fine-tuning: start from a previous run's (EMA) weights
            load_init(model, cfg, init_weights)
        return model

    loss = losses.lesion_loss if task == "lesion" else losses.dice_bce_loss
    if task == "lesion" and (pos_weight is not None or patch_dice or free_penalty or blob):
        weighting = {"pos_weight": pos_weight} if pos_weight is not None else {}

        def lesion_loss(y_true, y_pred):
            return losses.lesion_loss(y_true, y_pred, patch_dice=patch_dice, free_penalty=free_penalty, blob=blob,
                                      **weighting)
        loss = lesion_loss
    if blob:  # the blob term needs each patch's lesions numbered
        sampler = losses.InstanceTargets(sampler)
    return train(build, loss, sampler, out_dir=out, steps=cfg.steps,
                 learning_rate=cfg.learning_rate, seed=seed, log=log, workers=workers,
                 max_seconds=None if max_minutes is None else 60.0 * max_minutes, snapshot_every=snapshot_every,
                 stop_at=stop_at)


def main(argv=None):
    p = argparse.ArgumentParser(prog="cordseg train", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=["centerline", "sc", "conus", "lesion"])
    p.add_argument("--out", required=True)
    p.add_argument("--recipe", choices=["shipped"], help="run every stage the shipped model went through "
                   "(training/recipes.py), each in DIR/stageN; the other training options are then ignored")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--labelmaps", help="label maps: a folder with PAM50/ and spinegeneric/ (default: "
                   "../shared/data/labelmaps), the PAM50 folder alone, or .npz anatomies (synth.load_anatomies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="processes making batches (0: one thread)")
    p.add_argument("--max-minutes", type=float, help="stop (and save) after this long")
    p.add_argument("--stop-at", type=int, help="stop (and save) at this step; the learning rate still decays "
                   "over --steps")
    p.add_argument("--base-filters", type=int, help="CNN2 width")
    p.add_argument("--init-weights", help="start from these *.weights.h5 (fine-tuning)")
    p.add_argument("--data", help="a BIDS dataset with manual masks to mix into training (see training/bids.py)")
    p.add_argument("--real-fraction", type=float, default=0.5, help="share of samples from --data")
    p.add_argument("--contrast", help="contrasts of --data to use and to write into the model, comma-separated")
    p.add_argument("--pos-weight", type=float, help="lesion task: weight of lesion voxels in the cross-entropy "
                   "(default 2, as the shipped model; 5 found fewer lesions in bench/lesions.py)")
    p.add_argument("--patch-dice", type=float, default=0.0, help="lesion task: weight of a Dice per patch over "
                   "the patches holding lesions (each such patch counts alike, whatever its lesion volume)")
    p.add_argument("--free-penalty", type=float, default=0.0, help="lesion task: weight of a price on any "
                   "response in a lesion-free patch (training/losses.py)")
    p.add_argument("--blob-loss", type=float, default=0.0, help="lesion task: weight of a Dice per lesion, "
                   "averaged over the batch's lesions (training/losses.py::lesion_loss)")
    p.add_argument("--snapshot-every", type=int, default=1000, help="write an EMA weights snapshot every N steps "
                   "(to compare checkpoints of one run)")
    p.add_argument("--export", help="after training, export the final weights to this ONNX file")
    p.add_argument("--patch-shape", help="training patch, e.g. 32x32x32 (CNN2 is fully convolutional; the "
                   "exported model keeps the task's run-time patch)")
    p.add_argument("--real-backgrounds", action="store_true", help="lesion task: mix in lesions carved into "
                   "real lesion-free scans (training/carve.py; by default subjects unf01 and sub-01 of ../shared/data)")
    p.add_argument("--background-subjects", help="--real-backgrounds: comma-separated subjects whose scans are "
                   "the backgrounds (training/carve.py BACKGROUNDS: unf01, sub-01, sub-03, sct_testing, lumbar)")
    p.add_argument("--backgrounds-from", action="append", metavar="BIDS", help="lesion task: carve lesions into "
                   "these lesion-free scans too (implies --real-backgrounds): every T2w, T2star or MTS image under "
                   "BIDS/sub-*/ whose lesion-manual mask is absent or empty, with its seg-manual cord mask where "
                   "there is one (else cordseg's own); only these unless --background-subjects names shared ones")
    p.add_argument("--real-share", type=float, default=0.5, help="share of --real-backgrounds patches")
    p.add_argument("--lesions-as-seen", action="store_true", help="--real-backgrounds: each carved lesion's "
                   "brightness (1.1-2.0x the cord) is what the scan shows on its native voxels, not its tissue's "
                   "(small lesions on thick slices get brighter tissue; training/carve.py)")
    p.add_argument("--snap-ends", action="store_true", help="--real-backgrounds: carved patches that would reach "
                   "past a scan's first or last slice are moved inside it, as the runtime places its patches")
    p.add_argument("--vary-backgrounds", type=float, default=0.0, help="share of --real-backgrounds patches cut "
                   "from a varied scan: slices 2-5x thicker half of the time, another gamma, added noise")
    p.add_argument("--sagittal-share", type=float, help="CNN2: share of synthetic patches acquired sagittally, "
                   "with thick left-right slices (default 0.25)")
    p.add_argument("--dwi-share", type=float, default=0.0, help="sc: share of synthetic patches drawn as mean "
                   "diffusion-weighted images (synth.DWI_PRIOR)")
    p.add_argument("--lesion-style", choices=["shipped", "faint", "hard"],
                   help="lesion task: how synthetic lesions are drawn (training/synth.py LESION_STYLES; faint: "
                   "smaller and fainter lesions, more lesion-free patches, axial slices up to 17 mm; hard: also "
                   "bright grey matter, strong shading, lesions down to 1.1x the cord)")
    p.add_argument("--channels", help="CNN2 input channels, comma-separated, 'image' first (e.g. "
                   "image,cord_anomaly; see cordseg.normalization.CHANNELS)")
    p.add_argument("--cauda-equina", nargs="?", const="strands", choices=["strands", "bundle", "bundles"],
                   default=None,
                   help="add a dural sac with nerve roots below the template's conus (synth.add_cauda_equina) and "
                   "draw a share of its slices around the conus, so that the model learns where the cord ends; "
                   "'bundle': the roots gathered into one clump, as on real lumbar scans; 'bundles': several "
                   "copies of the template, each with its clump elsewhere (default: strands)")
    a = p.parse_args(argv)
    if a.task == "conus" and not a.cauda_equina and not a.recipe:  # what the conus network is for
        a.cauda_equina = "bundle"  # (the conus recipe's first stages are the cord recipe's: no roots there)
    if a.dwi_share and a.task != "sc":
        p.error("--dwi-share is for the cord task (sc)")
    if a.background_subjects and not (a.real_backgrounds or a.backgrounds_from):
        p.error("--background-subjects is for --real-backgrounds or --backgrounds-from")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    log = lambda m: print(m, flush=True)  # noqa: E731
    if a.recipe:
        from .recipes import run_recipe

        weights, steps = run_recipe(a.task, a.out, a.labelmaps or default_labelmaps(), run=run, workers=a.workers,
                                    log=log)
        summary = f"trained with `cordseg train {a.task} --recipe shipped`: {steps} steps over its stages"
        from .recipes import final_channels, final_shape

        a.channels = ",".join(final_channels(a.task))  # the network the last stage trained
        a.base_filters = final_shape(a.task).get("network", {}).get("base_filters")
        if a.export:
            _export(a, weights, steps, summary)
        return 0
    try:
        run(a.task, a.out, steps=a.steps, batch_size=a.batch_size, learning_rate=a.learning_rate,
            labelmaps=a.labelmaps, seed=a.seed, log=log, workers=a.workers,
            max_minutes=a.max_minutes, init_weights=a.init_weights, data=a.data, real_fraction=a.real_fraction,
            contrasts=a.contrast.split(",") if a.contrast else None,
            patch_shape=[int(v) for v in a.patch_shape.split("x")] if a.patch_shape else None, pos_weight=a.pos_weight,
            snapshot_every=a.snapshot_every, lesion_style=a.lesion_style, cauda_equina=a.cauda_equina,
            stop_at=a.stop_at,
            real_backgrounds=a.real_backgrounds, real_share=a.real_share, vary_backgrounds=a.vary_backgrounds,
            sagittal_share=a.sagittal_share,
            dwi_share=a.dwi_share, network={"base_filters": a.base_filters} if a.base_filters else None,
            channels=a.channels.split(",") if a.channels else None, patch_dice=a.patch_dice,
            free_penalty=a.free_penalty, lesions_as_seen=a.lesions_as_seen, blob=a.blob_loss, snap_ends=a.snap_ends,
            background_subjects=a.background_subjects.split(",") if a.background_subjects else None,
            background_dirs=a.backgrounds_from)
    except OptionError as err:
        p.error(str(err))
    if a.export:
        from .loop import last_snapshot, snapshot_step

        weights = last_snapshot(a.out)
        steps = snapshot_step(weights)
        summary = (f"trained with `cordseg train {a.task}`: {steps} steps, synthetic images"
                   + (f" mixed with {a.data} ({a.real_fraction:.0%})" if a.data else ""))
        _export(a, weights, steps, summary)
    return 0


def _export(a, weights, steps, summary):
    import keras

    from . import tasks

    contrast = a.contrast or ",".join(tasks.TASKS[a.task].contrasts)
    channels = getattr(a, "channels", None)
    base = getattr(a, "base_filters", None)
    if keras.backend.backend() == "tensorflow":
        from .export import export_from_weights

        export_from_weights(a.task, weights, a.export, contrast=contrast, summary=summary, steps=steps,
                            channels=channels.split(",") if channels else None,
                            network={"base_filters": base} if base else None)
    else:  # trained on JAX (GPU): tf2onnx needs the TensorFlow backend, so export in a fresh process
        import subprocess

        cmd = [sys.executable, "-m", f"{__package__}.export", a.task, str(weights), a.export,
               "--contrast", contrast, "--summary", summary, "--steps", str(steps)]
        if channels:
            cmd += ["--channels", channels]
        if base:
            cmd += ["--base-filters", str(base)]
        subprocess.run(cmd, env={**os.environ, "KERAS_BACKEND": "tensorflow"}, check=True)
    print(f"exported {a.export}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
