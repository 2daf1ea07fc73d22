"""The page's chat: a checkpoint loaded behind its Generator, answering one streamed turn at a time.

What to talk to is a run of the runs folder (its adapter on its base, its system prompt and [generation]
defaults, as ``swiftk infer`` loads it) or a model folder inside the workspace. One target is loaded at a time:
choosing another frees the first. Turns are answered one after another (a generator serves one caller); a
second browser tab waits for the first's answer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from swiftk.kernel.web.workspace import PathRefused, Workspace


@dataclass
class Session:
    spec: str
    target: Any  # kernel.served.Target
    loaded: Any  # kernel.served.Loaded
    generator: Any
    chat: bool  # the tokenizer has a chat template (else each turn is completed as raw text)

    def describe(self) -> str:
        return self.target.describe() + ("" if self.chat else " · no chat template: each turn is raw text")


class Chat:
    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace
        self.session: Session | None = None
        self.lock = threading.Lock()  # one turn (or load) at a time

    def target_path(self, choice: str) -> str:
        """A run's name from the runs folder, or a model folder typed into the page, checked to be inside the
        workspace; returned as the spec ``kernel.served.resolve`` takes."""
        choice = (choice or "").strip()
        if not choice:
            raise PathRefused("choose a run (or type a model folder inside the workspace) to chat with")
        if "/" not in choice and (self.workspace.runs / choice).is_dir():
            return str(self.workspace.run_dir(choice))
        return str(self.workspace.inside(choice, "model folder"))  # never a package: or hub spec: a folder here

    def open_locked(self, choice: str, engine: str = "hf") -> Session:
        """Load ``choice`` (unless it is the one loaded), closing the previous target first; the lock is held."""
        from swiftk.kernel.served import load, make_generator, resolve

        spec = self.target_path(choice)
        if self.session is not None and self.session.spec == spec:
            return self.session
        self.close_locked()
        target = resolve(spec)
        generation = target.generation_with(engine)
        loaded = load(target)
        generator = make_generator(target, loaded, generation, target.system_prompt)
        self.session = Session(spec, target, loaded, generator, loaded.tokenizer.chat_template is not None)
        return self.session

    def answer(self, choice: str, history: list[dict[str, str]], message: str, max_new_tokens: int = 128,
               temperature: float = 0.0) -> Iterator[str]:
        """The answer to ``message`` after ``history`` (``[{"role", "content"}]``), as it grows: each item is the
        whole text so far. Loading and answering hold the lock together: no other turn can swap the target
        between them."""
        from swiftk.kernel.cli.infer import pieces

        with self.lock:
            session = self.open_locked(choice)
            sampling = session.target.generation.sampling(max_new_tokens=max_new_tokens, temperature=temperature)
            system = session.target.system_prompt
            messages = ([{"role": "system", "content": system}] if system else []) + history + [
                {"role": "user", "content": message}]
            text = ""
            for piece in pieces(session.generator, messages if session.chat else message, sampling):
                text += piece
                yield text
        if not text:
            yield ""

    def close(self, timeout_s: float = 30.0) -> None:
        """Free the loaded target (waiting up to ``timeout_s`` for a turn being answered)."""
        if self.lock.acquire(timeout=timeout_s):
            try:
                self.close_locked()
            finally:
                self.lock.release()

    def close_locked(self) -> None:
        if self.session is not None:
            self.session.generator.close()
            self.session = None
