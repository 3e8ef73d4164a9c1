"""CLIP on ONNX Runtime: the open_clip model in use, exported at first need and cached by a fingerprint
of its weights.

`backend: onnx` exports the image and text towers (fp32, opset 17, dynamic batch) with torch's
exporter; each plain self-attention block (open_clip's ResidualAttentionBlock around
nn.MultiheadAttention: every ViT tower and the CLIP text tower) is exported as ONNX Runtime's fused
`com.microsoft.Attention` op (input projection, heads, softmax and causal mask in one kernel) instead
of the three dozen reshapes and transposes the exporter makes of nn.MultiheadAttention, which neither
ORT's graph optimiser nor `onnxruntime.transformers.optimizer` fuses. A causal text tower pooled at
the end token takes captions cut after the batch's longest (filters.clip.cut_captions; the sequence
axis is dynamic). Each export is checked against torch on random inputs of another batch size (and a
cut caption length); a tower whose fused export fails or disagrees is exported plainly, and one whose
plain export disagrees too fails with an ExportError that says to use the torch backend (open_clip's
ResNet image towers, RN50: their export gives other embeddings for batches of another size than
the example's).
`onnx_int8` then quantises the weights of the MatMul and Attention ops to int8 with ONNX Runtime's
dynamic quantisation (activations quantised per batch at run time; the patch-embedding Conv stays
fp32: ORT's ConvInteger is slower than its float Conv), and the result is checked again (cosine
>= 0.99 against torch).

The export lands in `<cache>/<fingerprint>/` (default `~/.cache/vlcurate/clip-onnx`, recipe
`clip.onnx_cache`), written under a temporary name and renamed, so concurrent workers on one machine
never read half a file; the fingerprint covers the architecture, the weights file's bytes (or the
seed of random weights), the backend, the export recipe's version and the torch and ONNX Runtime
versions, so other weights or another way of exporting never reuse an export.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings

import numpy as np

log = logging.getLogger(__name__)
BACKENDS = ("torch", "onnx", "onnx_int8")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "vlcurate", "clip-onnx")
# bump when the exported graph changes for the same weights (fused attention, quantised op types, ...)
EXPORT_VERSION = 3
INT8_OP_TYPES = ["MatMul", "Attention"]


def weights_fingerprint(model: str, weights: str, seed: int, backend: str) -> str:
    import onnxruntime
    import torch

    h = hashlib.sha256(f"{model}|{backend}|export-{EXPORT_VERSION}|torch-{torch.__version__}|"
                       f"ort-{onnxruntime.__version__}|".encode())
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

    from filters.clip import causal_text, encode_text_prefix

    os.makedirs(os.path.dirname(folder) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(folder) or ".")
    try:
        size = model.visual.image_size
        size = size if isinstance(size, tuple | list) else (size, size)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, model.vocab_size, (3, model.context_length), generator=gen)
        # a causal text tower takes captions cut after their end token (filters.clip.cut_captions): the
        # sequence axis is dynamic too, and the check runs a cut batch as well as a full one. The plain
        # export of nn.MultiheadAttention bakes the sequence length in, so its fallback takes all 77.
        # each: (module to trace, example input, dynamic axes of x, inputs to check it on)
        image = (_tower(model.encode_image), torch.zeros(2, 3, *size), {0: "n"},
                 [torch.randn(3, 3, *size, generator=gen)])
        text = (_tower(model.encode_text), torch.zeros(2, model.context_length, dtype=torch.long), {0: "n"},
                [tokens])
        cut_text = (_tower(lambda x: encode_text_prefix(model, x), model), text[1], {0: "n", 1: "seq"},
                    [tokens, tokens[:, :9]])
        towers = {"image": (image, image), "text": (cut_text if causal_text(model) else text, text)}
        for name, (fused, plain) in towers.items():
            fp32 = os.path.join(tmp, f"{name}.fp32.onnx")
            used = fused
            try:
                with _fused_attention(model):
                    _export(*fused[:3], fp32)
                _check(fused[0], fp32, fused[3])
                log.info("CLIP %s tower exported with fused attention", name)
            except Exception as e:  # noqa: BLE001 - an architecture the fused path does not cover: export plainly
                log.warning("CLIP %s tower: fused attention export failed (%s: %s); exporting it unfused",
                            name, type(e).__name__, str(e)[:200])
                used = plain
                _export(*plain[:3], fp32)
                _check(plain[0], fp32, plain[3], what=name)
            if int8:
                _quantise(fp32, os.path.join(tmp, f"{name}.onnx"))
                os.remove(fp32)
                _check(used[0], os.path.join(tmp, f"{name}.onnx"), used[3], min_cosine=0.99, what=name)
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


def _export(tower, example, axes: dict[int, str], path: str) -> None:
    import torch

    # with gradients on: under no_grad torch takes its own fused attention path, which has no ONNX op
    with torch.inference_mode(False), torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter
        torch.onnx.export(tower, (example,), path, input_names=["x"], output_names=["emb"],
                          dynamic_axes={"x": axes, "emb": {0: "n"}}, opset_version=17, dynamo=False,
                          custom_opsets={"com.microsoft": 1})


class ExportError(RuntimeError):
    """The model's ONNX export does not compute what torch does (open_clip's ResNet image towers:
    right for the example's batch size only)."""


def _check(tower, path: str, inputs, min_cosine: float = 0.9999, what: str = "") -> None:
    """The exported tower gives torch's embeddings (cosine per row) on each input, batches of another
    size than the example the exporter traced; raises where it does not (ExportError when `what`
    names the tower: the export cannot be used)."""
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for x in inputs:
        with torch.inference_mode():
            ref = tower(x).float().numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
        if not cos.min() >= min_cosine:
            msg = f"exported tower disagrees with torch (cosine {cos.min():.6f} < {min_cosine})"
            if what:
                raise ExportError(f"CLIP {what} tower: {msg}; this model cannot run on clip.backend onnx or "
                                  "onnx_int8: use clip.backend: torch")
            raise ValueError(msg)


def _quantise(src: str, dst: str) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # int8 weights per output channel: the bar is embedding cosine >= 0.99 against fp32
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, op_types_to_quantize=INT8_OP_TYPES,
                     per_channel=True, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _tower(encode, model=None):
    """A torch module around one of the model's encode methods, or a function of the model (what the
    exporter traces); the model is a registered submodule, so its weights become the graph's initialisers."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model if model is not None else encode.__self__

        def forward(self, x):
            return encode(x)

    return Tower()


class _NotFusable(Exception):
    """This attention call is not plain (causal or unmasked) self-attention."""


def _attention_function():
    import torch

    class Attention(torch.autograd.Function):
        """Self-attention with its input projection: x (n, l, e) @ weight (e, 3e) + bias, heads, softmax
        (causal when asked), merged heads. Exported as one com.microsoft.Attention node; forward
        computes the same in torch so the tracer has values to carry on with."""

        @staticmethod
        def forward(ctx, x, weight, bias, num_heads: int, causal: bool):
            n, seq, e = x.shape
            qkv = (x @ weight + bias).reshape(n, seq, 3, num_heads, e // num_heads).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
            return out.transpose(1, 2).reshape(n, seq, e)

        @staticmethod
        def symbolic(g, x, weight, bias, num_heads: int, causal: bool):
            out = g.op("com.microsoft::Attention", x, weight, bias, num_heads_i=num_heads,
                       unidirectional_i=int(causal))
            out.setType(x.type())
            return out

    return Attention


@contextlib.contextmanager
def _fused_attention(model):
    """Within: every plain self-attention block of `model` computes its attention with the Attention
    function above (so it exports as one fused op); yields how many blocks were patched."""
    import functools

    import torch
    from open_clip.transformer import ResidualAttentionBlock

    function = _attention_function()

    def attention(attn, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:
            raise _NotFusable("cross-attention")
        causal = False
        if attn_mask is not None:
            seq = q_x.shape[1]
            mask = torch.full((seq, seq), float("-inf")).triu(1)
            if attn_mask.shape != mask.shape or not torch.equal(attn_mask.float().cpu(), mask):
                raise _NotFusable("an attention mask other than the causal one")
            causal = True
        out = function.apply(q_x, attn.in_proj_weight.t(), attn.in_proj_bias, attn.num_heads, causal)
        return attn.out_proj(out)

    patched = []
    for block in model.modules():
        attn = getattr(block, "attn", None)
        if (type(block) is ResidualAttentionBlock and isinstance(attn, torch.nn.MultiheadAttention)
                and attn.batch_first and attn._qkv_same_embed_dim and attn.in_proj_bias is not None
                and attn.bias_k is None and not attn.add_zero_attn and not hasattr(block, "ln_1_kv")):
            block.attention = functools.partial(attention, attn)  # shadows the method on this instance
            patched.append(block)
    try:
        yield len(patched)
    finally:
        for block in patched:
            del block.attention


class OnnxClip:
    """Two ONNX Runtime sessions (image, text) with the threads the task has."""

    def __init__(self, paths: dict[str, str], threads: int, device: str = "cpu"):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else \
            ["CPUExecutionProvider"]
        providers = [p for p in providers if p in ort.get_available_providers()]
        self.image = ort.InferenceSession(paths["image"], opts, providers=providers)
        self.text = ort.InferenceSession(paths["text"], opts, providers=providers)
        # a symbolic sequence axis: the text tower was exported to take captions cut after their end token
        self.cut = isinstance(self.text.get_inputs()[0].shape[1], str)

    def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self.image.run(None, {"x": np.ascontiguousarray(pixels, dtype=np.float32)})[0]

    def encode_text(self, tokens: np.ndarray) -> np.ndarray:
        from filters.clip import cut_captions

        tokens = cut_captions(tokens) if self.cut else tokens
        return self.text.run(None, {"x": np.ascontiguousarray(tokens, dtype=np.int64)})[0]


def load(model, model_name: str, weights: str, seed: int, backend: str, threads: int, cache: str = "",
         device: str = "cpu") -> OnnxClip:
    """The ONNX sessions for `model` (exported, and quantised for onnx_int8, at first need)."""
    folder = os.path.join(cache or DEFAULT_CACHE, weights_fingerprint(model_name, weights, seed, backend))
    try:
        paths = export(model, folder, int8=backend == "onnx_int8")
    except ExportError as e:
        raise ExportError(f"{model_name}: {e}") from None
    return OnnxClip(paths, threads, device)
