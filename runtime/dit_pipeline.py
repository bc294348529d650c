"""A diffusers-shaped entry point: ``DiTPipeline.from_pretrained(DIR)(class_labels=[207, 360])``.

For users who know diffusers' ``DiTPipeline``: the same call for the common arguments, returning an
object with ``.images``. It is a thin layer over freedit's ``Pipeline`` (runtime/pipeline.py): every
image is made by ``Pipeline.generate``, so seeds, samplers and backends behave as documented there.

How the arguments map, and where the defaults differ from diffusers' on purpose:

- ``class_labels``: ImageNet indices, or names for 1000-class models (runtime/class_names.py).
- ``guidance_scale`` (default 4.0, as diffusers and DiT's sample.py) is freedit's ``cfg_scale``;
  1 turns guidance off. freedit guides as DiT's reference sampler does: the first 3 of the 4 latent
  ε channels (diffusers' pipeline guides all 4).
- ``num_inference_steps`` (default 250, DiT's sample.py; diffusers' is 50 steps of the folder's
  scheduler) respaces DiT's 1000-step schedule. The sampler is DiT's DDPM with the learned variance
  the DiT predicts (diffusers' pipeline drops those channels and uses its scheduler's fixed
  variance); ``sampler="free"`` (the default with a drafter) gives the same law with fewer serial
  DiT calls, ``sampler="ddim"`` (eta 0) is closest to a DDIM scheduler.
- ``generator``: an int seed or anything with ``initial_seed()`` (a ``torch.Generator``); None
  draws a fresh seed, returned as ``.seed``. freedit's noise is keyed by (seed, sample index), so one
  seed gives every image its own noise; a list of generators is refused.
- ``output_type``: "pil" (list of PIL images), "np" (float32 [N, H, W, 3] in [0, 1], from the uint8
  images) or "latent" (the final latents [N, 4, h, w], not decoded). diffusers' "pt" is not offered:
  the runtime runs without torch.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from freedit.runtime.class_names import IMAGENET_CLASSES, imagenet_names, lookup
from freedit.runtime.pipeline import GenerationResult, Pipeline

OUTPUT_TYPES = ("pil", "np", "latent")


@dataclass
class ImagePipelineOutput:
    images: list | np.ndarray
    seed: int  # the seed the images were made with (drawn when none was given)
    result: GenerationResult  # freedit's full result: per-sample statistics, latents, settings


def _seed_of(generator) -> int:
    if generator is None:
        return secrets.randbits(63)
    if isinstance(generator, (list, tuple)):
        raise ValueError("give one generator or seed: freedit keys each image's noise by (seed, sample index), "
                         "so one seed already gives every image its own noise")
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return int(generator)
    if callable(getattr(generator, "initial_seed", None)):
        return int(generator.initial_seed())
    raise ValueError(f"generator must be an int seed or have initial_seed() (a torch.Generator), got {type(generator).__name__}")


class DiTPipeline:
    def __init__(self, pipeline: Pipeline, sampler: str | None = None):
        self.pipeline, self.sampler = pipeline, sampler

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, backend: str = "onnxruntime", threads: int | None = None,
                        sampler: str | None = None) -> "DiTPipeline":
        """A model directory written by ``freedit export`` (not a diffusers folder: export that first)."""
        return cls(Pipeline.from_directory(model_dir, backend=backend, threads=threads), sampler)

    @property
    def labels(self) -> dict[str, int]:
        """Name -> class index, as diffusers' ``pipe.labels`` (ImageNet models; names of two classes left out)."""
        if self.pipeline.info.num_classes != IMAGENET_CLASSES:
            return {}
        found: dict[str, list[int]] = {}
        for i, names in enumerate(imagenet_names()):
            for name in names:
                found.setdefault(name, []).append(i)
        return {name: ids[0] for name, ids in sorted(found.items()) if len(set(ids)) == 1}

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        if self.pipeline.info.num_classes != IMAGENET_CLASSES:
            raise ValueError(f"class names are for ImageNet models; this one has classes "
                             f"0..{self.pipeline.info.num_classes - 1}")
        return [lookup(name) for name in ([label] if isinstance(label, str) else label)]

    def __call__(self, class_labels: Sequence[int | str], guidance_scale: float = 4.0, generator=None,
                 num_inference_steps: int = 250, output_type: str = "pil", return_dict: bool = True,
                 sampler: str | None = None, **generate_kwargs):
        """Images for ``class_labels``. Other ``Pipeline.generate`` options (``window``, ``batch_size``,
        ``relax``, ``progress``, ...) pass through."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        labels = list([class_labels] if isinstance(class_labels, (str, int)) else class_labels)
        names = [y for y in labels if isinstance(y, str)]
        ids = iter(self.get_label_ids(names)) if names else None
        labels = [next(ids) if isinstance(y, str) else y for y in labels]
        seed = _seed_of(generator)
        result = self.pipeline.generate(labels, sampler=sampler or self.sampler, steps=num_inference_steps,
                                        cfg_scale=guidance_scale, seed=seed, decode=output_type != "latent",
                                        **generate_kwargs)
        if output_type == "latent":
            images = result.samples
        elif output_type == "np":
            images = result.images.astype(np.float32) / 255.0
            images = images[..., None] if images.ndim == 3 else images
        else:
            from PIL import Image

            images = [Image.fromarray(image) for image in result.images]
        return ImagePipelineOutput(images, seed, result) if return_dict else (images,)
