"""The PyTorch side: DiT and drafter modules, checkpoints, diffusion maths in torch, training, ONNX export."""
