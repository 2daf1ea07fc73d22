"""Images through `swiftk serve` and `swiftk infer`: chat messages with image parts become the prompts the vlm stage
answers; a tiny LLaVA trained to read colours (once per module) answers OpenAI image_url parts from the real openai
client, and --image files; a text model and the vllm engine refuse images before loading anything."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from swiftk.contracts import SamplingParams
from swiftk.kernel.cli import main
from swiftk.kernel.config import DataConfig, ModelConfig
from swiftk.kernel.serving import ChatMessage
from swiftk.kernel.vlm import VisionTokenize, greedy_answers, load_processor, load_vision_model
from swiftk.plugins.generators.hf import VisionGenerator

from .test_serving import Server
from .test_vlm import COLOUR_RUN

QUESTION = "What colour is the shape?"


@pytest.fixture(scope="module")
def colour_run(llava: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaVA trained 300 steps to name the shape's colour (~15 s; test_vlm.py checks what it learns)."""
    root = tmp_path_factory.mktemp("colour_run")
    config = root / "colour.toml"
    config.write_text(COLOUR_RUN.format(model=llava / "model", data=llava / "data", out=root / "run"))
    assert main(["run", str(config)]) == 0
    return root / "run"


def held_out(llava: Path, n: int) -> list[tuple[Path, str]]:
    """The first ``n`` held-out images and their colours."""
    rows = [json.loads(line) for line in (llava / "data" / "eval.jsonl").read_text().splitlines()[:n]]
    return [(llava / "data" / r["messages"][0]["content"][0]["image"], r["messages"][1]["content"]) for r in rows]


def data_url(image: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()


def asking(url: str, question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def test_image_url_parts_are_kept_for_a_vlm_and_refused_for_a_text_model() -> None:
    url = "data:image/png;base64,iVBORw0KGgo="
    message = ChatMessage.model_validate(asking(url)[0])
    assert message.plain(images=True)["content"] == asking(url)[0]["content"]
    with pytest.raises(ValueError, match="parts of type image_url are not supported: this model reads text only"):
        message.plain()
    for elsewhere in ("https://example.com/cat.png", "/etc/hosts"):  # never fetched, never read
        with pytest.raises(ValueError, match="as a data: URL"):
            ChatMessage.model_validate(asking(elsewhere)[0]).plain(images=True)
    text = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert text.plain(images=True)["content"] == "ab"


def test_chats_with_images_are_answered_as_the_vlm_stage_answers_its_prompts(llava: Path) -> None:
    """Batched left-padded (one image, two images as a file path and a data URL, none), the generator's greedy
    answers are those of ``greedy_answers`` over ``VisionTokenize.prompt`` samples, one at a time."""
    processor = load_processor(ModelConfig(model_id=str(llava / "model")))
    model = load_vision_model(ModelConfig(model_id=str(llava / "model")), processor, torch.device("cpu")).eval()
    (first, _), (second, _) = held_out(llava, 2)
    chats = [asking(data_url(first)),
             [{"role": "user", "content": [{"type": "image", "image": str(first)},
                                           {"type": "image_url", "image_url": {"url": data_url(second)}},
                                           {"type": "text", "text": "Same colour?"}]}],
             [{"role": "user", "content": QUESTION}]]
    generator = VisionGenerator(model, processor, system_prompt="Answer in one word.")
    prompter = VisionTokenize(processor, DataConfig(train_file="x", system_prompt="Answer in one word."), "messages",
                              None)
    prompts = [prompter.prompt("chat", chat) for chat in chats]
    answers = generator.generate(chats, SamplingParams(max_new_tokens=6))
    assert [a.text.strip() for a in answers] == greedy_answers(model, processor, prompts, 6, 1, nullcontext)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert [p.input_ids.count(image_id) for p in prompts] == [4, 8, 0]  # (28 / 14)^2 tokens per image
    assert [generator.prompt_length(chat) for chat in chats] == [len(p.input_ids) for p in prompts]
    assert "".join(generator.stream(chats[1], SamplingParams(max_new_tokens=6))) == answers[1].text


def test_images_a_model_cannot_take_are_refused_before_loading(llava: Path, tmp_path: Path, capsys) -> None:
    text_model = tmp_path / "text"
    text_model.mkdir()
    (text_model / "config.json").write_text('{"model_type": "llama"}')  # no weights: nothing may load
    image = str(held_out(llava, 1)[0][0])
    assert main(["infer", str(text_model), "--image", image, "--prompt", QUESTION]) == 2
    assert "is a text model, which reads text only" in capsys.readouterr().err
    assert main(["infer", str(llava / "model"), "--image", str(tmp_path / "nothing.png"), "--prompt", "hi"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["serve", str(llava / "model"), "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "is a vision-language model" in err and "--engine hf" in err


def test_a_lora_run_loads_as_its_adapter_on_its_base(llava: Path, tmp_path: Path) -> None:
    """A vlm LoRA run (its frozen vision tower keeps random adapters, which the base-weights check leaves out) is
    rebuilt as training built it: the logits of a prompt with an image are those of PEFT's own loading of final/."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from swiftk.kernel.served import load, resolve
    from swiftk.kernel.vlm import prompt_batch

    config = tmp_path / "lora.toml"
    config.write_text(COLOUR_RUN.format(model=llava / "model", data=llava / "data", out=tmp_path / "run")
                      .replace('"full"', '"lora"').replace("lr = 1e-3", "lr = 5e-2")
                      .replace("max_steps = 300", "max_steps = 2").replace("every = 300", "every = 100"))
    assert main(["run", str(config)]) == 0
    target = resolve(str(tmp_path / "run"))
    loaded = load(target)
    assert target.vision and loaded.adapter and "vision-language" in target.describe()
    prompter = VisionTokenize(loaded.processor, DataConfig(train_file="x"), "messages", None)
    batch = prompt_batch([prompter.prompt("chat", asking(data_url(held_out(llava, 1)[0][0])))],
                         loaded.tokenizer.pad_token_id)
    reference = AutoModelForImageTextToText.from_pretrained(llava / "model").eval()
    with torch.no_grad():
        base = reference(**batch).logits
        reference = PeftModel.from_pretrained(reference, tmp_path / "run" / "final").eval()
        ours, theirs = loaded.model(**batch).logits, reference(**batch).logits
    torch.testing.assert_close(ours, theirs)
    assert not torch.allclose(ours, base, atol=1e-3)  # the adapter is on


@pytest.mark.slow
def test_a_served_vlm_reads_the_colour_of_held_out_images(colour_run: Path, llava: Path) -> None:
    """The trained run's final/ served: six concurrent chat requests, each a held-out image as an image_url data URL,
    are answered with its colour (nearly all); streaming gives the same answer; a broken image is a 400 naming it,
    and the server goes on serving."""
    server = Server(str(colour_run / "final"))
    client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=120)
    name = colour_run.name
    try:
        images = held_out(llava, 6)

        def ask(image: Path) -> str:
            reply = client.chat.completions.create(model=name, messages=asking(data_url(image)), max_tokens=8)
            assert reply.usage.prompt_tokens > 4 + len(QUESTION)  # the image's 4 tokens, the text's characters
            return str(reply.choices[0].message.content).strip()

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, [image for image, _ in images]))
        assert sum(a == colour for a, (_, colour) in zip(answers, images, strict=True)) >= 5, (answers, images)
        chunks = client.chat.completions.create(model=name, messages=asking(data_url(images[0][0])), max_tokens=8,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == answers[0]
        with pytest.raises(openai.BadRequestError, match=r"messages \(image 1\): .*not an image"):
            client.chat.completions.create(model=name, messages=asking("data:image/png;base64,bm90IGFuIGltYWdl"))
        assert ask(images[0][0]) == answers[0]
    finally:
        assert server.stop() == 0


@pytest.mark.slow
def test_infer_with_an_image_prints_its_colour(colour_run: Path, llava: Path, capsys) -> None:
    image, colour = held_out(llava, 1)[0]
    assert main(["infer", str(colour_run), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == f"{colour}\n"
