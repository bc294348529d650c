"""FID and Inception Score of generated ImageNet samples against a user-supplied reference batch.

Uses torch-fidelity (extra `fid`; its Inception weights are downloaded on first use, so this needs
network access once). Latent samples are decoded with the model directory's vae_decoder.onnx
(`freedit export --vae ...`) on ONNX Runtime first.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def decode_latents(model_dir: str | Path, latents: np.ndarray, batch: int = 16) -> np.ndarray:
    """Latents [N,4,h,w] -> uint8 images [N, 8h, 8w, 3] via vae_decoder.onnx."""
    import onnxruntime as ort

    path = Path(model_dir) / "vae_decoder.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: FID needs images; export the VAE decoder with "
                                f"`freedit export --vae stabilityai/sd-vae-ft-ema`")
    session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
    images = [session.run(["image"], {"latent": latents[i:i + batch].astype(np.float32)})[0]
              for i in range(0, len(latents), batch)]
    out = np.concatenate(images)
    return np.clip((out + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def fid_is(pipe, samples: np.ndarray, reference: np.ndarray) -> dict:
    try:
        import torch
        import torch_fidelity
    except ModuleNotFoundError:
        raise ModuleNotFoundError("FID/IS needs torch-fidelity: pip install 'freedit[fid]'", name="torch_fidelity") from None
    images = decode_latents(pipe.source, samples) if pipe.info.in_channels == 4 else samples

    class _Images(torch.utils.data.Dataset):
        def __init__(self, arr):
            self.arr = arr

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, i):
            return torch.from_numpy(np.ascontiguousarray(self.arr[i].transpose(2, 0, 1)))

    metrics = torch_fidelity.calculate_metrics(input1=_Images(images), input2=_Images(reference), fid=True, isc=True,
                                               cuda=torch.cuda.is_available(), verbose=False)
    return {"fid": float(metrics["frechet_inception_distance"]),
            "inception_score": float(metrics["inception_score_mean"])}
