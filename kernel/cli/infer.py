"""``swiftk infer RUN|MODEL``: chat with a finished run or a model, or answer a JSONL file of prompts."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import IO, Any

from swiftk.kernel.cli.run import quiet_libraries
from swiftk.kernel.served import add_target_arguments

DESCRIPTION = textwrap.dedent("""\
    Chat with a finished run or a model, answer one prompt, or answer a file of prompts.

    RUN|MODEL: a run directory (config.toml + final/: its adapter on the base it was trained on, or its full
    model; its [data] system_prompt, chat template and [generation] defaults apply), a Hugging Face model folder,
    a hub id already in the local cache, or package:NAME --gguf-file FILE (a pip package's GGUF file).

    Interactive (stdin a terminal or a pipe): each line is a user turn; the answer streams as it is generated
    and the conversation is kept. /reset starts over, /system TEXT sets the system prompt, /exit (or Ctrl-D)
    ends. Answers go to stdout; the banner and the commands' replies to stderr.

    One prompt: --prompt TEXT answers that user turn on stdout and exits.

    Batch: --prompts FILE --out FILE. Each input row is a JSON object with "prompt" (text, sent as a user turn)
    or "messages" (a chat); each output row is the input plus "completion", "finish_reason" ("stop"|"length")
    and "completion_tokens".

    Images: a vision-language model (a `[train] stage = "vlm"` run, or a model folder whose config has a vision
    part: LLaVA, Idefics3...) reads images. --image FILE (repeatable) puts them before the text of --prompt's
    turn, or of a conversation's first turn (again after /reset). In a --prompts file, a row's messages hold
    them as content parts, as training rows do ({"type": "image", "image": "cat.png"}, relative to the file's
    folder, or OpenAI's {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}).
    A vision-language model generates with --engine hf only; a text model refuses --image.

    exit codes: 0 done, 1 a model or data error, 2 bad arguments or an unknown RUN|MODEL.""")

HELP = "/reset: start over · /system TEXT: set the system prompt (/system alone shows it) · /exit or Ctrl-D: quit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_target_arguments(parser)
    parser.add_argument("--prompts", default=None, metavar="FILE", help="batch mode: JSONL input rows")
    parser.add_argument("--out", default=None, metavar="FILE", help="batch mode: JSONL output rows")
    parser.add_argument("--prompt", default=None, metavar="TEXT", help="answer this one user turn and exit")
    parser.add_argument("--image", action="append", default=None, metavar="FILE", help="a vision-language model: "
                        "an image for --prompt's turn or the conversation's first turn (repeatable)")
    parser.add_argument("--system", default=None, metavar="TEXT", help="the system prompt (default: the run's "
                        "[data] system_prompt)")
    sampling = parser.add_argument_group("sampling (defaults: the run's [generation] table)")
    sampling.add_argument("--max-new-tokens", type=int, default=None)
    sampling.add_argument("--temperature", type=float, default=None, help="0: greedy")
    sampling.add_argument("--top-p", type=float, default=None)
    sampling.add_argument("--top-k", type=int, default=None)
    sampling.add_argument("--seed", type=int, default=None)
    sampling.add_argument("--stop", action="append", default=None, metavar="TEXT",
                          help="end an answer before this text (repeatable)")


def main(args: argparse.Namespace) -> int:
    quiet_libraries()  # before anything imports peft (and so bitsandbytes, which talks on import)
    from swiftk.kernel.served import UsageError, load, make_generator, resolve

    if (args.prompts is None) != (args.out is None):
        raise UsageError("--prompts and --out go together: --prompts FILE --out FILE answers FILE's rows")
    if args.prompts and (args.prompt is not None or args.image):
        raise UsageError("--prompts FILE answers the file's rows: --prompt and --image are for one turn (a row's "
                         "images are content parts of its messages)")
    rows = read_prompts(Path(args.prompts)) if args.prompts else []
    images = checked_images(args.image or [])
    target = resolve(args.target, args.gguf_file)
    if images and not target.vision:
        raise UsageError(f"--image: {args.target} is a text model, which reads text only. Give a vision-language "
                         f"run ([train] stage = 'vlm') or model folder, or drop --image.")
    generation = target.generation_with(args.engine)
    try:
        sampling = generation.sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                       top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    loaded = load(target, merged=args.merged)
    if images and loaded.tokenizer.chat_template is None:
        raise UsageError("--image: the model's tokenizer has no chat template, so its prompts are raw text, which "
                         "cannot carry images")
    system = args.system if args.system is not None else target.system_prompt
    generator = make_generator(target, loaded, generation, system, report=lambda line: print(line, file=sys.stderr),
                               images_base=Path(args.prompts).parent if args.prompts else None)
    try:
        if args.prompts:
            answer_file(generator, loaded.tokenizer, rows, sampling, Path(args.out), generation.batch_size)
        elif args.prompt is not None:
            answer_once(generator, loaded.tokenizer, sampling, system, user_content(args.prompt, images), sys.stdout)
        else:
            shown = f" · {len(images)} image(s) before the first turn" if images else ""
            banner = f"swiftk infer: {target.describe()} · {generation.engine} engine{shown} · {HELP}"
            converse(generator, loaded.tokenizer, sampling, system, banner, sys.stdin, sys.stdout, images)
    finally:
        generator.close()
    return 0


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """The rows of a prompts file, each checked; an error names the line and what a row should hold."""
    from swiftk.kernel.served import UsageError

    if not path.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: not JSON ({exc.msg}); each line is one object with \"prompt\" "
                             f"or \"messages\"") from None
        ok = isinstance(row, dict) and (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list)
                                        and all(isinstance(m, dict) and "role" in m for m in row["messages"]))
        if not ok:
            raise UsageError(f"{path}:{number}: a row needs \"prompt\" (text) or \"messages\" (a list of "
                             f"{{\"role\", \"content\"}} objects)")
        rows.append(row)
    if not rows:
        raise UsageError(f"--prompts {path}: the file has no rows")
    return rows


def checked_images(given: list[str]) -> list[str]:
    """``--image`` files, each read once now (a missing or broken one stops before the model loads), as absolute
    paths."""
    from swiftk.kernel.images import ImageError, load_image
    from swiftk.kernel.served import UsageError

    paths = [Path(value).expanduser().resolve() for value in given]
    for value, path in zip(given, paths, strict=True):
        if not path.is_file():
            raise UsageError(f"--image {value}: no such file")
        try:
            load_image(str(path), where=f"--image {value}")
        except ImageError as exc:
            raise UsageError(str(exc)) from None
    return [str(path) for path in paths]


def user_content(text: str, images: list[str]) -> str | list[dict[str, Any]]:
    """A user turn's content: the text, after its images where it has any (as the vlm stage's rows put them)."""
    if not images:
        return text
    return [*({"type": "image", "image": path} for path in images), {"type": "text", "text": text}]


def answer_once(generator: Any, tokenizer: Any, sampling: Any, system: str | None, content: Any,
                stdout: IO[str]) -> None:
    """One user turn's answer, streamed to ``stdout``."""
    if tokenizer.chat_template is None:  # raw text (main refuses images then)
        write_answer(generator, content, sampling, stdout)
        return
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    write_answer(generator, messages, sampling, stdout)


def answer_file(generator: Any, tokenizer: Any, rows: list[dict[str, Any]], sampling: Any, out: Path,
                batch_size: int) -> None:
    """Answer ``rows`` ``batch_size`` at a time, writing each batch's rows as soon as it is done."""
    from swiftk.kernel.served import UsageError

    chat = tokenizer.chat_template is not None
    if not chat and any("prompt" not in row for row in rows):
        raise UsageError("the model's tokenizer has no chat template: give \"prompt\" rows (raw text), not "
                         "\"messages\"")
    prompts = [row["messages"] if "prompt" not in row else
               [{"role": "user", "content": row["prompt"]}] if chat else row["prompt"] for row in rows]
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as handle:
        for start in range(0, len(rows), batch_size):
            completions = generator.generate(prompts[start : start + batch_size], sampling)
            for row, completion in zip(rows[start : start + batch_size], completions, strict=True):
                handle.write(json.dumps({**row, "completion": completion.text,
                                         "finish_reason": completion.finish_reason,
                                         "completion_tokens": len(completion.token_ids)}) + "\n")
            handle.flush()
            print(f"answered {min(start + batch_size, len(rows))}/{len(rows)}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


def converse(generator: Any, tokenizer: Any, sampling: Any, system: str | None, banner: str, stdin: IO[str],
             stdout: IO[str], images: list[str] | None = None) -> None:
    """The interactive loop: one line, one turn; the answer streams to ``stdout``. ``images`` go with the first
    turn of each conversation."""
    chat = tokenizer.chat_template is not None
    tty = stdin.isatty()
    print(banner if chat else f"{banner} · no chat template: each line is completed as raw text", file=sys.stderr)
    history: list[dict[str, Any]] = []
    if tty:
        import readline  # noqa: F401  (line editing and history for input())
    while True:
        line = read_line(stdin, tty)
        if line is None:  # Ctrl-D, or the end of piped input
            return
        text = line.rstrip("\n")
        command, _, rest = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history.clear()
            print("(conversation reset)", file=sys.stderr)
            continue
        if command == "/system":
            if rest.strip():
                system = rest.strip()
                print("(system prompt set)", file=sys.stderr)
            else:
                print(f"(system prompt: {system!r})", file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"(unknown command {command}; {HELP})", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": user_content(text, [] if history else images or [])})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        answer = write_answer(generator, messages if chat else text, sampling, stdout)
        if chat:
            history.append({"role": "assistant", "content": answer})
        else:
            history.clear()


def write_answer(generator: Any, prompt: Any, sampling: Any, stdout: IO[str]) -> str:
    """The answer to ``prompt``, written to ``stdout`` as it is generated, then a newline."""
    answer = ""
    for piece in pieces(generator, prompt, sampling):
        answer += piece
        stdout.write(piece)
        stdout.flush()
    stdout.write("\n")
    stdout.flush()
    return answer


def read_line(stdin: IO[str], tty: bool) -> str | None:
    if not tty:
        return stdin.readline() or None
    try:
        return input("> ")
    except EOFError:
        print(file=sys.stderr)
        return None


def pieces(generator: Any, prompt: Any, sampling: Any) -> Any:
    stream = getattr(generator, "stream", None)
    if stream is not None:
        return stream(prompt, sampling)
    return iter([generator.generate([prompt], sampling)[0].text])
