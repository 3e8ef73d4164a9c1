"""CLIP on ONNX Runtime: the open_clip model in use, exported at first need and cached by a fingerprint
of its weights.

`backend: onnx` exports the image and text towers (fp32, opset 17, dynamic batch) with torch's
exporter; `onnx_int8` then quantises their weights to int8 with ONNX Runtime's dynamic quantisation
(activations stay float, quantised per batch at run time). The export lands in
`<cache>/<fingerprint>/` (default `~/.cache/vlcurate/clip-onnx`, recipe `clip.onnx_cache`), written
under a temporary name and renamed, so concurrent workers on one machine never read half a file; the
fingerprint covers the architecture, the weights file's bytes (or the seed of random weights), the
backend and the torch version, so other weights never reuse an export.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile

import numpy as np

BACKENDS = ("torch", "onnx", "onnx_int8")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vlcurate", "clip-onnx")


def weights_fingerprint(model: str, weights: str, seed: int, backend: str) -> str:
    import torch

    h = hashlib.sha256(f"{model}|{backend}|{torch.__version__}|".encode())
    if weights:
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    else:
        h.update(f"random-seed-{seed}".encode())
    return h.hexdigest()[:24]


def export(model, folder: str, int8: bool) -> dict[str, str]:
    """The image and text towers of `model` as ONNX files in `folder` (made when missing); their paths."""
    paths = {"image": os.path.join(folder, "image.onnx"), "text": os.path.join(folder, "text.onnx")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    import torch

    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(folder) or ".")
    try:
        size = model.visual.image_size
        size = size if isinstance(size, tuple | list) else (size, size)
        towers = {"image": (_tower(model.encode_image), torch.zeros(2, 3, *size)),
                  "text": (_tower(model.encode_text), torch.zeros(2, model.context_length, dtype=torch.long))}
        for name, (tower, example) in towers.items():
            fp32 = os.path.join(tmp, f"{name}.fp32.onnx")
            # with gradients on: under no_grad torch takes the fused attention path, which has no ONNX op
            with torch.inference_mode(False), torch.enable_grad():
                torch.onnx.export(tower, (example,), fp32, input_names=["x"], output_names=["emb"],
                                  dynamic_axes={"x": {0: "n"}, "emb": {0: "n"}}, opset_version=17, dynamo=False)
            if int8:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(fp32, os.path.join(tmp, f"{name}.onnx"), weight_type=QuantType.QInt8)
                os.remove(fp32)
            else:
                os.replace(fp32, os.path.join(tmp, f"{name}.onnx"))
        try:
            os.replace(tmp, folder)  # atomic: another worker that finished first wins, ours is dropped
        except OSError:
            if not all(os.path.exists(p) for p in paths.values()):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _tower(encode):
    """A torch module around one of the model's encode methods (what the exporter traces); the model is
    a registered submodule, so its weights become the graph's initialisers."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = encode.__self__

        def forward(self, x):
            return encode(x)

    return Tower()


class OnnxClip:
    """Two ONNX Runtime sessions (image, text) with the threads the task has."""

    def __init__(self, paths: dict[str, str], threads: int, device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else \
            ["CPUExecutionProvider"]
        providers = [p for p in providers if p in ort.get_available_providers()]
        self.image = ort.InferenceSession(paths["image"], opts, providers=providers)
        self.text = ort.InferenceSession(paths["text"], opts, providers=providers)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.image.run(None, {"x": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        return self.text.run(None, {"x": np.ascontiguousarray(tokens, dtype=np.int64)})[0]


def load(model, model_name: str, weights: str, seed: int, backend: str, threads: int, cache: str = "",
         device: str = "cpu") -> OnnxClip:
    """The ONNX sessions for `model` (exported, and quantised for onnx_int8, at first need)."""
    folder = os.path.join(cache or DEFAULT_CACHE, weights_fingerprint(model_name, weights, seed, backend))
    return OnnxClip(export(model, folder, int8=backend == "onnx_int8"), threads, device)
