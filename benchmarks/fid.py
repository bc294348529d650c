"""FID and Inception Score of generated ImageNet samples against a user-supplied reference batch.

Uses torch-fidelity (extra `fid`; its Inception weights are downloaded on first use, so this needs
network access once). Latent DiTs' images come decoded from the Pipeline (the model directory's
vae_decoder, `freedit export --vae ...`).
"""
from __future__ import annotations

import numpy as np


def fid_is(images: np.ndarray, reference: np.ndarray) -> dict:
    """``images``: uint8 [N, H, W, 3] (GenerationResult.images, decoded for latent DiTs)."""
    try:
        import torch
        import torch_fidelity
    except ModuleNotFoundError:
        raise ModuleNotFoundError("FID/IS needs torch-fidelity: pip install 'freedit[fid]'", name="torch_fidelity") from None

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
