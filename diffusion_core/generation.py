"""Sample sets from a trained model folder: per-sample seeds, class assignment, guidance, decoding, saving.

`generate(bundle, num, ...)` draws `num` samples; sample i uses seed `seed + i` only (EDM's per-sample seeds), so a
set is the same whatever the batch size or the number of workers. With `classes`, sample i gets
`classes[i % len(classes)]`. Latent models are decoded through their autoencoder (`bundle.to_images`); x0 is
clipped to [-1, 1] in pixel space only (latents have no fixed range).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .guidance import ClassifierFreeGuidance, ClassifierGuidance
from .io import atomic_path
from .model_folders import ClassifierBundle, DiffusionBundle
from .models import StudentFamily
from .precision import Bf16, resolve_bf16
from .samplers import SAMPLERS, SPACINGS, SamplingSpec, resolve_options, sample  # noqa: F401 (re-exported)
from .samplers.grids import grid_timesteps

GUIDANCE_KINDS = ("none", "classifier", "cfg")
SEED_FILE = "seed-{:06d}.png"
_SEED_FILE_RE = re.compile(r"^seed-\d{6,}\.png$")


class SamplingError(ValueError):
    """A sampling request that cannot be honoured (bad option or option combination); the message names the fix."""


def check_device(device: str | torch.device | None) -> torch.device:
    """torch.device for `device` (None: cpu); SamplingError (one line) if it is not a device or is absent here."""
    if device is None:
        return torch.device("cpu")
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SamplingError(f"device {str(device)!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise SamplingError(f"device {str(device)!r}: no CUDA GPU is available on this machine; use cpu")
        if d.index is not None and d.index >= n:
            raise SamplingError(f"device {str(device)!r}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SamplingError(f"device {str(device)!r}: MPS is not available on this machine; use cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise SamplingError(f"device {str(device)!r} is not supported for sampling; use cpu, cuda, cuda:N or mps")
    return d


def _check_options(bundle: DiffusionBundle, num: int, spec: SamplingSpec, classifier_bundle: ClassifierBundle | None,
                   classes: Sequence[int] | None, batch_size: int) -> dict:
    """SamplingError (one line) for every option or combination that cannot work; returns the sampler's options.
    A flat list of independent checks, one per option, kept in the one place that validates them."""
    sampler, steps, spacing, guidance_kind, scale = spec.sampler, spec.steps, spec.spacing, spec.guidance, spec.scale
    T = bundle.diffusion.num_timesteps
    try:
        resolved = resolve_options(sampler, dict(spec.options))
    except ValueError as e:
        raise SamplingError(str(e)) from None
    if guidance_kind not in GUIDANCE_KINDS:
        raise SamplingError(f"unknown guidance {guidance_kind!r}; choose one of {', '.join(GUIDANCE_KINDS)}")
    if spacing not in SPACINGS:
        raise SamplingError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if num < 1:
        raise SamplingError(f"num must be >= 1, got {num}")
    if batch_size < 1:
        raise SamplingError(f"batch size must be >= 1, got {batch_size}")
    if steps is not None and not 1 <= steps <= T:
        raise SamplingError(f"steps must be in 1..{T} (the model's T), got {steps}")
    if scale < 0:
        raise SamplingError(f"guidance scale must be >= 0, got {scale}")
    if classes is not None and len(classes) == 0:
        raise SamplingError("classes is empty; give at least one class index")
    model_k = bundle.num_classes
    if guidance_kind == "cfg" and model_k is None:
        raise SamplingError("classifier-free guidance (cfg) needs a class-conditional model; this model is "
                            "unconditional: use --guidance classifier with --classifier, or none")
    if guidance_kind == "classifier":
        if classifier_bundle is None:
            raise SamplingError("classifier guidance needs a noisy classifier: "
                                "pass --classifier (e.g. models/classifier)")
        _check_classifier(bundle, classifier_bundle)
    elif classes is not None and model_k is None:
        raise SamplingError("this model is unconditional, so classes need classifier guidance: add "
                            "--guidance classifier --classifier models/classifier")
    if classes is not None:
        known = classifier_bundle.num_classes if guidance_kind == "classifier" else model_k
        if model_k is not None:
            known = min(known, model_k)
        bad = [c for c in classes if not 0 <= int(c) < known]
        if bad:
            raise SamplingError(f"class {bad[0]} is not known to the model (classes are 0..{known - 1})")
    return resolved


def _check_classifier(bundle: DiffusionBundle, clf: ClassifierBundle) -> None:
    mine, theirs = bundle.config["diffusion"], clf.config.get("diffusion")
    if theirs is None:
        raise SamplingError("the classifier's config.json has no 'diffusion' block, so its timesteps cannot be "
                            "matched to the model's: retrain it with train_classifier")
    for key in ("schedule", "num_timesteps", "logsnr_shift"):
        if mine.get(key, 0.0) != theirs.get(key, 0.0):
            raise SamplingError(f"classifier was trained for diffusion {key}={theirs.get(key)!r} but the model uses "
                                f"{mine.get(key)!r}: use a classifier trained with the same schedule")
    cfg = clf.config["model"]
    shape = tuple(bundle.shape)
    if len(shape) != 3 or cfg.get("in_channels") != shape[0] or cfg.get("image_size") != shape[-1]:
        raise SamplingError(f"classifier expects {cfg.get('in_channels')} channels at {cfg.get('image_size')}px but "
                            f"the model samples {list(shape)}: use the classifier trained for this model's space")
    if bundle.num_classes is not None and clf.num_classes != bundle.num_classes:
        raise SamplingError(f"classifier has {clf.num_classes} classes but the model has {bundle.num_classes}")


def sample_labels(num: int, classes: Sequence[int] | None, start: int = 0) -> np.ndarray:
    """Labels of samples start..start+num-1: classes[i % len(classes)]; -1 (unconditional) when classes is None."""
    if classes is None:
        return np.full(num, -1, dtype=np.int64)
    classes = np.asarray([int(c) for c in classes], dtype=np.int64)
    return classes[np.arange(start, start + num) % len(classes)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1], [N, C, H, W] -> uint8 [N, H, W, C] (round to nearest of 256 levels)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class FastDenoiser(torch.nn.Module):
    """The denoiser under bf16 autocast and/or channels_last, returning float32: the sampler's math stays float32.

    Measured here (bench/README.md, "Fastest settings"): the default latent U-Net's forward at batch 500 on one
    thread ran 429 samples/s in fp32 and 1,198 under bf16 + channels_last. Samples are then not bitwise those of
    fp32 (the network's activations round to bf16); they stay the same whatever the batch size (tested).
    `channels_last` converts the wrapped model's 4-D weights in place; `restore()` converts them back (unless they
    were channels_last already, e.g. a model being trained that way).
    """

    def __init__(self, model: torch.nn.Module, bf16: bool = False, channels_last: bool = False):
        super().__init__()
        self.model, self.bf16 = model, bool(bf16)
        # a weight whose two layouts differ tells which one the model is in (a 1-channel input conv's do not)
        telling = [p for p in model.parameters()
                   if p.ndim == 4 and p.is_contiguous() != p.is_contiguous(memory_format=torch.channels_last)]
        was_channels_last = bool(telling) and telling[0].is_contiguous(memory_format=torch.channels_last)
        self.channels_last, self._convert = bool(channels_last), bool(channels_last) and not was_channels_last
        if self._convert:
            model.to(memory_format=torch.channels_last)

    def forward(self, x_t, t, y=None):
        if self.channels_last and x_t.ndim == 4:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.model(x_t, t, y)
        return out.float().contiguous()

    def restore(self) -> None:
        if self._convert:
            self.model.to(memory_format=torch.contiguous_format)


class _CountingModel(torch.nn.Module):
    """Wraps the denoiser to count per-sample network evaluations (a CFG double batch counts 2 per step)."""

    def __init__(self, model, drop_y: bool):
        super().__init__()
        self.model, self.drop_y, self.evals = model, drop_y, 0

    def forward(self, x_t, t, y=None):
        self.evals += x_t.shape[0]
        return self.model(x_t, t, None if self.drop_y else y)


class _CountingClassifier(torch.nn.Module):
    """Wraps the noisy classifier of classifier guidance to count its per-sample evaluations (each a forward and
    a backward pass: the gradient of log p(y | x_t))."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier, self.evals = classifier, 0

    def forward(self, x_t, t):
        self.evals += x_t.shape[0]
        return self.classifier(x_t, t)


@torch.no_grad()
def generate(bundle: DiffusionBundle, num: int, spec: SamplingSpec | None = None, *,
             classifier_bundle: ClassifierBundle | None = None, classes: Sequence[int] | None = None, seed: int = 0,
             start: int = 0, batch_size: int = 64, device: str | torch.device | None = None, progress: bool = False,
             bf16: Bf16 = False, channels_last: bool = False) -> dict:
    """Draw samples i = start..start+num-1 of a set with `spec` (default: the folder's own sampler, every timestep,
    no guidance); sample i uses seed `seed + i` and label `classes[i % len]`.

    `start` lets workers split one set: generate(num=k, start=j) on each gives exactly that slice of the set.
    Returns {"images": uint8 [N, H, W, C] (image data) or "points": float32 [N, D] (point data), "labels": int64 [N]
    (-1 = unconditional), "seeds": int64 [N], "nfe": denoiser evaluations per sample, "classifier_nfe": noisy
    classifier evaluations per sample (classifier guidance; 0 otherwise), "seconds": wall time, "options": the
    sampler's options with defaults filled in}.
    Without `classes`, cfg and classifier guidance cycle through all classes; no guidance on a class-conditional
    model then samples unconditionally (the null class).
    `bf16` / `channels_last` run the denoiser under bf16 autocast / in channels_last memory format (FastDenoiser;
    its speed-up: bench/README.md; off by default, which keeps samples bitwise fp32);
    bf16="auto" turns it on only where the device computes bf16 natively (`precision.bf16_is_fast`).
    """
    spec = spec if spec is not None else SamplingSpec(sampler=default_sampler(bundle))
    options = _check_options(bundle, num, spec, classifier_bundle, classes, batch_size)
    if classes is None and spec.guidance != "none":
        classes = list(range(classifier_bundle.num_classes if spec.guidance == "classifier" else bundle.num_classes))
    if start < 0:
        raise SamplingError(f"start must be >= 0, got {start}")
    labels = sample_labels(num, classes, start)
    seeds = np.arange(seed + start, seed + start + num, dtype=np.int64)
    device = check_device(device)
    net, guidance, grid = bundle.model.to(device).eval(), None, {}
    if bundle.config.get("student"):  # one call per step, the guidance scale its input, its own grid from T-1
        net, grid = _student_member(bundle, spec, options), {"lambda_min": None}
    else:
        guidance = _guidance(spec.guidance, spec.scale, bundle, classifier_bundle, device)
    classifier = guidance.classifier if isinstance(guidance, ClassifierGuidance) else None
    fast = FastDenoiser(net, bf16=resolve_bf16(bf16, device), channels_last=channels_last)
    model = _CountingModel(fast, drop_y=bundle.num_classes is None)
    pixel = not bundle.is_latent
    bar = None
    if progress:
        from tqdm.auto import tqdm

        steps = spec.steps or bundle.diffusion.num_timesteps
        bar = tqdm(total=num, desc=f"{spec.sampler} {steps} steps", unit="sample")
    # the spec as the loop reads it: guidance is the object built above (or the student's own input)
    loop_spec = replace(spec, options=options, guidance="none", scale=1.0)
    start, chunks = time.perf_counter(), []
    try:
        for lo in range(0, num, batch_size):
            hi = min(lo + batch_size, num)
            y = None if classes is None else torch.as_tensor(labels[lo:hi], device=device)
            x0 = sample(bundle.diffusion, model, (hi - lo, *bundle.shape), loop_spec, seeds=seeds[lo:hi].tolist(),
                        y=y, clip_denoised=pixel, guidance=guidance, device=device, **grid)
            chunks.append(bundle.to_images(x0).float().cpu())
            if bar is not None:
                bar.update(hi - lo)
    finally:
        fast.restore()
        if bar is not None:
            bar.close()
    x = torch.cat(chunks)
    data = {"images": to_uint8(x)} if x.ndim == 4 else {"points": x.numpy().astype(np.float32)}
    return {**data, "labels": labels, "seeds": seeds, "nfe": model.evals / num,
            "classifier_nfe": classifier.evals / num if classifier is not None else 0.0,
            "seconds": time.perf_counter() - start, "options": options}


class _GuidedStudent(torch.nn.Module):
    """A distilled student with its guidance scale bound: forward(x_t, t, y) = member(x_t, t, y, w)."""

    def __init__(self, member: torch.nn.Module, w: float):
        super().__init__()
        self.member, self.w = member, float(w)

    def forward(self, x_t, t, y=None):
        return self.member(x_t, t, y, torch.full((x_t.shape[0],), self.w, device=x_t.device))


def _student_member(bundle: DiffusionBundle, spec: SamplingSpec, options: dict) -> torch.nn.Module:
    """The member of a student family (models/student) for `steps`, checked against the grid it was distilled on;
    `--guidance cfg --scale W` becomes its input w (none: w = 1, the conditional model, or the null class)."""
    student = bundle.config["student"]
    if (spec.sampler, spec.spacing) != (student["sampler"], student["spacing"]) or options.get("eta", 0.0) != 0.0:
        raise SamplingError(f"a distilled student samples on the grid it was distilled for: sampler "
                            f"{student['sampler']}, spacing {student['spacing']}, eta 0; got {spec.sampler}, "
                            f"{spec.spacing}, eta {options.get('eta', 0.0):g}: set those (or leave them at their "
                            "defaults)")
    family = bundle.model  # a StudentFamily (progressive), or one network for every step count (consistency)
    distilled = family.steps if isinstance(family, StudentFamily) else tuple(student["steps"])
    if spec.steps not in distilled:
        raise SamplingError(f"this student was distilled for {', '.join(map(str, distilled))} steps, not "
                            f"{spec.steps}: pass --steps with one of them")
    if spec.guidance == "classifier":
        raise SamplingError("a distilled student has classifier-free guidance built in, not classifier guidance: "
                            "use --guidance cfg --scale W (or none)")
    member = family.member(spec.steps) if isinstance(family, StudentFamily) else family
    if not student.get("guidance_input"):
        if spec.guidance == "cfg" and spec.scale != 1.0:
            raise SamplingError(f"this student was distilled from the conditional teacher (scale 1) without the "
                                f"guidance scale as an input; scale {spec.scale:g} needs distill.scale_range")
        return member
    return _GuidedStudent(member, spec.scale if spec.guidance == "cfg" else 1.0)


def default_sampler(bundle: DiffusionBundle) -> str:
    """The sampler a folder samples with when none is named: a distilled student's own, else ddim."""
    return (bundle.config.get("student") or {}).get("sampler", "ddim")


def _guidance(kind: str, scale: float, bundle: DiffusionBundle, classifier_bundle: ClassifierBundle | None,
              device: torch.device):
    """The guidance wrapper `sample` takes: None, classifier-free (null class of the model) or classifier."""
    if kind == "cfg":
        return ClassifierFreeGuidance(scale, null_class=bundle.num_classes)
    if kind == "classifier":
        return ClassifierGuidance(_CountingClassifier(classifier_bundle.model.to(device).eval()), scale)
    return None


def sampling_steps(bundle: DiffusionBundle, steps: int | None, spacing: str = "trailing") -> int:
    """Number of grid points before any log-SNR clamping (for labels and reports)."""
    T = bundle.diffusion.num_timesteps
    return T if steps is None else len(grid_timesteps(bundle.diffusion.schedule, steps, spacing))


def _write_png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")


def _write_npz(path: Path, **arrays) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


def _nfe(result: dict) -> dict:
    """samples.npz's `nfe` key: network evaluations per sample (CFG counts two per step)."""
    return {"nfe": np.float64(result["nfe"])} if "nfe" in result else {}


def _save_points(out: Path, result: dict, labels: np.ndarray, seeds: np.ndarray) -> list[Path]:
    """Point samples: a scatter plot (`out` ending in .png), or samples.npz and grid.png in the folder `out`."""
    from .data.preview import save_scatter

    scatter_labels = np.where(labels >= 0, labels, 0)
    if out.suffix.lower() == ".png":
        save_scatter(result["points"], scatter_labels, out, title="samples")
        return [out]
    _write_npz(out / "samples.npz", points=result["points"], labels=labels, seeds=seeds, **_nfe(result))
    save_scatter(result["points"], scatter_labels, out / "grid.png", title="samples")
    return [out / "samples.npz", out / "grid.png"]


def save_samples(out: str | os.PathLike, result: dict, nrow: int | None = None) -> list[Path]:
    """Write `generate`'s result; returns the paths written.

    `out` ending in .png: one grid image. Otherwise a folder: one `seed-%06d.png` per sample, `samples.npz`
    (images uint8 [N, H, W, C], labels, seeds) and `grid.png`; every file atomically, and stale `seed-*.png` of an
    earlier, larger run removed. Point data gets a scatter plot instead of images.
    """
    from .data.preview import save_image_grid

    out = Path(out)
    labels, seeds = np.asarray(result["labels"]), np.asarray(result["seeds"])
    if nrow is None:
        distinct = len(np.unique(labels[labels >= 0]))
        nrow = distinct if 1 < distinct <= 20 else min(len(seeds), 10)
    if "points" in result:
        return _save_points(out, result, labels, seeds)
    images = np.asarray(result["images"])
    if images.dtype != np.uint8 or images.ndim != 4:
        raise SamplingError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    scale = max(1, 56 // images.shape[1])
    if out.suffix.lower() == ".png":
        save_image_grid(images, out, nrow=nrow, scale=scale)
        return [out]
    if out.exists() and not out.is_dir():
        raise SamplingError(f"--out {out} exists and is not a folder; give a folder or a .png path")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for img, s in zip(images, seeds):
        written.append(out / SEED_FILE.format(int(s)))
        _write_png(written[-1], img)
    keep = {p.name for p in written}
    for p in out.iterdir():
        if _SEED_FILE_RE.match(p.name) and p.name not in keep:
            p.unlink()
    _write_npz(out / "samples.npz", images=images, labels=labels, seeds=seeds, **_nfe(result))
    save_image_grid(images, out / "grid.png", nrow=nrow, scale=scale)
    return written + [out / "samples.npz", out / "grid.png"]
