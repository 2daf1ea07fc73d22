"""The Gradio page of ``swiftk web`` and the HTTP app that serves it.

Four tabs:
- **Launch**: a form (model, stage, tuner, data, a few hyperparameters) builds a commented config with
  ``kernel.starter`` (the code ``swiftk init`` uses), checks it as ``swiftk run`` would (the same messages), shows
  the TOML, and starts or stops the run as a subprocess (``launcher``).
- **Watch**: one run's status line, progress, loss and metric curves, memory, what its hosts, reloads and tenants
  did, and its eval results; refreshed every ``refresh_s`` from the run's events, sending nothing when nothing
  was appended.
- **Compare**: several runs' curves of one metric on one plot, and their eval reports side by side (Δ against the
  first, starred where significant: ``kernel.evals.report.compare``).
- **Chat**: a run or model folder answering streamed turns through its Generator (``chat``).

Bound to a loopback address the page is open to this machine's users; bound anywhere else every request needs the
access token (``?token=`` once, then a cookie; or ``Authorization: Bearer``).
"""

from __future__ import annotations

import math
import os
import re
import secrets
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from swiftk.kernel.errors import SwiftkError
from swiftk.kernel.web.chat import Chat
from swiftk.kernel.web.launcher import Launcher, machine_memory, memory_mib
from swiftk.kernel.web.runs import RunView
from swiftk.kernel.web.workspace import PathRefused, Workspace

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no analytics or version pings

TOKEN_COOKIE = "swiftk_web_token"
UPLOADS = ("/upload", "/upload_progress")  # Gradio's upload routes (under /gradio_api)
PACKAGE = re.compile(r"^package:[A-Za-z_][A-Za-z0-9_]*$")
MAX_POINTS = 2000  # per curve sent to the browser; longer curves are thinned evenly (last point kept)
DEFAULT = ""  # a form field left at the preset's value


@dataclass
class Views:
    """One ``RunView`` per run folder, shared by every browser session (a refresh reads only what is new)."""

    workspace: Workspace

    def __post_init__(self) -> None:
        self.views: dict[str, RunView] = {}
        self.lock = threading.Lock()

    def get(self, name: str) -> RunView:
        run_dir = self.workspace.run_dir(name)
        with self.lock:
            view = self.views.get(name)
            if view is None:
                view = self.views[name] = RunView(run_dir)
            return view.refresh()

    def names(self) -> list[str]:
        return [p.name for p in self.workspace.run_dirs()]


def thinned(points: list[tuple[int, float]], limit: int = MAX_POINTS) -> list[tuple[int, float]]:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    return [points[int(i * stride)] for i in range(limit - 1)] + [points[-1]]


LOSS_SERIES = ("train loss", "eval loss")


def curves(series: dict[str, list[tuple[int, float]]], named: tuple[str, ...] = ()) -> Any:
    """A LinePlot's value: ``series`` (name -> points), long-form. Every name in ``named`` gets at least an empty
    (NaN) row, so a plot created with it knows those series from its first render: Gradio's chart fixes its series
    (colours, legend) when it is drawn and takes only the data from later updates."""
    import pandas as pd

    rows = [(step, value, name) for name, points in series.items() for step, value in thinned(points)]
    rows += [(0, math.nan, name) for name in named if not series.get(name)]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def build(workspace: Workspace, launcher: Launcher, chat: Chat, refresh_s: float = 1.0) -> Any:
    """The page (a ``gr.Blocks``)."""
    import gradio as gr

    from swiftk.kernel import starter

    views = Views(workspace)
    with gr.Blocks(title="swiftk", analytics_enabled=False) as page:
        gr.Markdown(f"## swiftk · {workspace.root}", elem_id="title")
        with gr.Tabs():
            # -- Launch ------------------------------------------------------------------------------------------
            with gr.Tab("Launch", id="launch"):
                with gr.Row():
                    name = gr.Textbox(label="run name", value="web_run", elem_id="launch-name")
                    model = gr.Dropdown([(c.label, c.key) for c in starter.MODELS.values()], value="smollm2",
                                        allow_custom_value=True, label="model (a preset, or a model folder / hub id)",
                                        elem_id="launch-model")
                    stage = gr.Dropdown([(c.label, c.key) for c in starter.STAGES.values()], value="sft",
                                        label="stage", elem_id="launch-stage")
                    tuner = gr.Dropdown([(c.label, c.key) for c in starter.TUNERS.values()], value="lora",
                                        label="tuner", elem_id="launch-tuner")
                with gr.Row():
                    data = gr.Dropdown([("the stage's shipped data", DEFAULT)] + workspace.data_files(),
                                       value=DEFAULT, allow_custom_value=True,
                                       label="training data (a file inside the workspace)", elem_id="launch-data")
                    lr = gr.Textbox(label="learning rate", placeholder="preset", elem_id="launch-lr")
                    max_steps = gr.Textbox(label="max steps", placeholder="preset (epochs)", elem_id="launch-steps")
                    batch_size = gr.Textbox(label="batch size", placeholder="preset", elem_id="launch-batch")
                    lora_rank = gr.Textbox(label="LoRA rank", placeholder="preset", elem_id="launch-rank")
                    precision = gr.Dropdown([("preset", DEFAULT), "auto", "bf16", "fp32"], value=DEFAULT,
                                            label="precision", elem_id="launch-precision")
                with gr.Row():
                    overwrite = gr.Checkbox(label="overwrite an existing run of this name", value=False,
                                            elem_id="launch-overwrite")
                    check_button = gr.Button("Check", elem_id="launch-check")
                    start_button = gr.Button("Start", variant="primary", elem_id="launch-start")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="launch-stop")
                    resume_button = gr.Button("Resume", elem_id="launch-resume")
                launch_status = gr.Markdown(elem_id="launch-status")
                with gr.Row():
                    toml = gr.Code(label="config", language=None, interactive=False, elem_id="launch-toml")
                    console = gr.Textbox(label="console", lines=18, max_lines=18, interactive=False,
                                         elem_id="launch-console")

            # -- Watch -------------------------------------------------------------------------------------------
            with gr.Tab("Watch", id="watch"):
                with gr.Row():
                    watch_run = gr.Dropdown(views.names(), label="run", elem_id="watch-run")
                    watch_metric = gr.Dropdown(["lr"], value=None, allow_custom_value=True, label="second curve",
                                               elem_id="watch-metric")
                    watch_stop = gr.Button("Stop this run", variant="stop", elem_id="watch-stop")
                    watch_resume = gr.Button("Resume this run", elem_id="watch-resume")
                watch_status = gr.Markdown(elem_id="watch-status")
                watch_action = gr.Markdown(elem_id="watch-action")  # what Stop / Resume did
                watch_memory = gr.Markdown(elem_id="watch-memory")
                with gr.Row():
                    loss_plot = gr.LinePlot(curves({}, LOSS_SERIES), x="step", y="value", color="series",
                                            title="loss", height=320, elem_id="watch-loss")
                    metric_plot = gr.LinePlot(curves({}), x="step", y="value", title="the second curve's metric",
                                              height=320, elem_id="watch-metric-plot")
                evals = gr.Dataframe(headers=["task", "metric", "value", "± stderr", "n", "step"], interactive=False,
                                     label="eval results (RUN/eval/results.json)", elem_id="watch-evals")
                with gr.Accordion("hosts: deaths, restarts, plugin failures", open=False):
                    hosts = gr.Dataframe(headers=["step", "event", "host / plugin", "pid", "what", "tenant"],
                                         interactive=False, elem_id="watch-hosts")
                with gr.Accordion("hot reloads", open=False):
                    reloads = gr.Dataframe(headers=["step", "plugin", "outcome", "detail"], interactive=False,
                                           elem_id="watch-reloads")
                with gr.Accordion("tenants: audit records", open=False):
                    audit = gr.Dataframe(headers=["step", "tenant", "plugin", "action", "reason", "layers"],
                                         interactive=False, elem_id="watch-audit")
                watch_seen = gr.State(None)

            # -- Compare -----------------------------------------------------------------------------------------
            with gr.Tab("Compare", id="compare"):
                with gr.Row():
                    compare_runs = gr.Dropdown(views.names(), multiselect=True, label="runs (the first is the "
                                               "baseline)", elem_id="compare-runs")
                    compare_metric = gr.Dropdown(["loss"], value="loss", allow_custom_value=True, label="metric",
                                                 elem_id="compare-metric")
                compare_note = gr.Markdown(elem_id="compare-note")
                compare_plot = gr.LinePlot(x="step", y="value", color="series", title="", height=360,
                                           elem_id="compare-plot")
                compare_evals = gr.Dataframe(interactive=False, label="eval results", elem_id="compare-evals")

            # -- Chat --------------------------------------------------------------------------------------------
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    chat_target = gr.Dropdown(finished(workspace), allow_custom_value=True,
                                              label="talk to (a finished run, or a model folder in the workspace)",
                                              elem_id="chat-target")
                    chat_tokens = gr.Slider(8, 512, value=128, step=8, label="max new tokens", elem_id="chat-tokens")
                    chat_temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="temperature (0: greedy)",
                                                 elem_id="chat-temperature")
                chat_status = gr.Markdown(elem_id="chat-status")
                chatbot = gr.Chatbot(label="chat", height=420, elem_id="chat-box")
                with gr.Row():
                    chat_message = gr.Textbox(label="message", placeholder="ask something, then Enter",
                                              elem_id="chat-message", scale=5)
                    chat_send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
                    chat_clear = gr.Button("Clear", elem_id="chat-clear", scale=1)

        timer = gr.Timer(refresh_s)

        # -- Launch handlers -------------------------------------------------------------------------------------
        form = [name, model, stage, tuner, data, lr, max_steps, batch_size, lora_rank, precision]

        def answers(*values: Any) -> Any:
            (name_v, model_v, stage_v, tuner_v, data_v, lr_v, steps_v, batch_v, rank_v, precision_v) = values
            data_path = None
            if data_v:
                data_path = workspace.relative(workspace.inside(str(data_v), "training data"))
            return starter.Answers(
                name=str(workspace.run_dir(str(name_v).strip()).name), model=model_path(workspace, str(model_v)),
                stage=stage_v, tuner=tuner_v, data=data_path, lr=number(lr_v, "learning rate", float),
                max_steps=number(steps_v, "max steps", int), batch_size=number(batch_v, "batch size", int),
                lora_rank=number(rank_v, "LoRA rank", int), precision=precision_v or None,
                runs_dir=workspace.relative(workspace.runs))

        def checked(*values: Any) -> tuple[Any, str]:
            """The form's answers and config text, checked exactly as ``swiftk run`` checks a file."""
            chosen = answers(*values)
            where = workspace.web_dir / f"{chosen.name}.toml"  # where Start writes it
            text = starter.config_text(chosen, workspace.relative(where))
            starter.check(text, workspace.relative(where))
            return chosen, text

        def on_check(*values: Any) -> tuple[str, str]:
            try:
                _, text = checked(*values)
            except (SwiftkError, ValueError) as exc:
                return problem(exc), ""
            return "✅ the config is valid: **Start** runs it", text

        def on_start(*values: Any) -> tuple[str, str, str]:
            *form_values, overwrite_v = values
            try:
                chosen, text = checked(*form_values)
                launched = launcher.start(chosen.name, text, overwrite=bool(overwrite_v))
            except (SwiftkError, ValueError, OSError) as exc:
                return problem(exc), "", ""
            return (f"▶ started **{launched.name}** (pid {launched.process.pid}): `swiftk run "
                    f"{workspace.relative(launched.config)}`; follow it in **Watch**", text, "")

        def on_stop(name_v: str) -> str:
            try:
                return launcher.stop(str(name_v).strip())
            except SwiftkError as exc:
                return problem(exc)

        def on_resume(name_v: str) -> str:
            try:
                launched = launcher.resume(str(name_v or "").strip())
            except SwiftkError as exc:
                return problem(exc)
            return (f"▶ resumed **{launched.name}** from its latest checkpoint (pid {launched.process.pid}): "
                    f"`swiftk run {workspace.relative(launched.config)} --resume`")

        def on_console(name_v: str) -> Any:
            name_v = str(name_v or "").strip()
            if name_v not in launcher.runs:
                return gr.skip()
            launched = launcher.runs[name_v]
            return launcher.log_tail(name_v) + f"\n[{launched.exit_text()}]"

        model.change(lambda chosen: starter.default_tuner(str(chosen or "")), model, tuner)  # tiny: full
        check_button.click(on_check, form, [launch_status, toml])
        start_button.click(on_start, [*form, overwrite], [launch_status, toml, console])
        stop_button.click(on_stop, [name], [launch_status])
        resume_button.click(on_resume, [name], [launch_status])
        timer.tick(on_console, [name], [console], show_progress="hidden")

        # -- Watch handlers --------------------------------------------------------------------------------------
        def on_watch(run_name: str | None, metric: str | None, seen: Any) -> Any:
            outputs = 9
            if not run_name:
                return (*([gr.skip()] * outputs), seen)
            try:
                view = views.get(run_name)
            except SwiftkError as exc:
                return (problem(exc), *([gr.skip()] * (outputs - 1)), seen)
            status = view.status()
            memory = machine_memory()
            if status.pid is not None:
                mib = memory_mib(status.pid)
                memory = (f"run process tree {mib:,.0f} MiB · " if mib is not None else "") + memory
            report = view.report_path
            key = (run_name, metric, len(view.events), view.error, status.state,
                   report.stat().st_mtime if report.is_file() else None)
            if key == seen:  # nothing new: only the memory line changes
                return (*([gr.skip()] * (outputs - 1)), memory, seen)
            metrics = view.metric_names()
            head = f"**{run_name}** · {status.line()}" + (f"\n\n⚠ {view.error}" if view.error else "")
            losses = {"train loss": view.curve("loss"), "eval loss": view.curve("eval_loss")}
            chosen = metric if metric in metrics else default_metric(metrics)
            second = {"value": view.curve(chosen)} if chosen else {}
            choices = [m for m in metrics if m not in ("loss",)]
            return (head, curves(losses, LOSS_SERIES), curves(second),
                    gr.update(choices=choices or ["lr"], value=chosen), view.eval_rows() or None,
                    view.host_rows() or None, view.reload_rows() or None, view.audit_rows() or None, memory, key)

        watch_outputs = [watch_status, loss_plot, metric_plot, watch_metric, evals, hosts, reloads, audit,
                         watch_memory, watch_seen]
        timer.tick(on_watch, [watch_run, watch_metric, watch_seen], watch_outputs, show_progress="hidden")
        watch_run.change(on_watch, [watch_run, watch_metric, gr.State(None)], watch_outputs)
        watch_metric.input(on_watch, [watch_run, watch_metric, gr.State(None)], watch_outputs)
        watch_stop.click(on_stop, [watch_run], [watch_action])
        watch_resume.click(on_resume, [watch_run], [watch_action])

        def on_runs() -> tuple[Any, Any, Any]:
            names = views.names()
            return (gr.update(choices=names), gr.update(choices=names),
                    gr.update(choices=finished(workspace)))

        run_timer = gr.Timer(max(5.0, refresh_s))
        run_timer.tick(on_runs, None, [watch_run, compare_runs, chat_target], show_progress="hidden")

        # -- Compare handlers ------------------------------------------------------------------------------------
        def on_compare(names: list[str] | None, metric: str | None) -> Iterator[tuple[Any, Any, Any, str]]:
            try:
                chosen, metrics, metric = compare_choice(views, names, metric)
            except SwiftkError as exc:
                yield gr.skip(), gr.skip(), gr.skip(), problem(exc)
                return
            if not chosen:
                yield gr.skip(), None, gr.skip(), "choose runs to compare"
                return
            table, note = compare_table(chosen)
            frame = curves({v.name: v.curve(metric) for v in chosen} if metric else {})
            # Gradio's chart keeps its first series (colours, legend) on a data update, and redraws with the value
            # before the current one when a setting changes: a changed title, then the real one, redraw it right.
            choices = gr.update(choices=metrics or ["loss"], value=metric)
            yield gr.update(value=frame, title=f"{metric} "), table, choices, note
            yield gr.update(value=frame, title=metric or ""), gr.skip(), gr.skip(), gr.skip()

        compare_outputs = [compare_plot, compare_evals, compare_metric, compare_note]
        compare_runs.change(on_compare, [compare_runs, compare_metric], compare_outputs)
        compare_metric.input(on_compare, [compare_runs, compare_metric], compare_outputs)

        # -- Chat handlers ---------------------------------------------------------------------------------------
        def on_send(target: str, history: list[dict[str, Any]] | None, message: str, tokens: float,
                    temperature: float) -> Iterator[tuple[Any, str, str]]:
            history = list(history or [])
            message = (message or "").strip()
            if not message:
                yield history, "", gr.skip()
                return
            turns = [{"role": m["role"], "content": text_of(m["content"])} for m in history]
            history.append({"role": "user", "content": message})
            history.append({"role": "assistant", "content": ""})
            try:
                yield history, "", f"loading {target} …" if chat.session is None else gr.skip()
                for text in chat.answer(target, turns, message, int(tokens), float(temperature)):
                    history[-1] = {"role": "assistant", "content": text}
                    yield history, "", gr.skip()
            except Exception as exc:  # a bad target, a model that fails to load or to generate: said, not raised
                history.pop()
                history.pop()
                yield history, message, problem(exc)
                return
            session = chat.session
            yield history, "", session.describe() if session is not None else ""

        send_inputs = [chat_target, chatbot, chat_message, chat_tokens, chat_temperature]
        chat_send.click(on_send, send_inputs, [chatbot, chat_message, chat_status])
        chat_message.submit(on_send, send_inputs, [chatbot, chat_message, chat_status])
        chat_clear.click(lambda: ([], ""), None, [chatbot, chat_status])
        chat_target.change(lambda: ([], ""), None, [chatbot, chat_status])

    return page


# ---------------------------------------------------------------------------------------------------------- helpers

def number(text: Any, what: str, kind: type) -> Any:
    """A form's number field: empty is the preset's value; anything else must parse as ``kind``."""
    text = str(text if text is not None else "").strip()
    if not text:
        return None
    try:
        value = kind(float(text)) if kind is int and float(text).is_integer() else kind(text)
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not {'an integer' if kind is int else 'a number'}") from None
    return value


def model_path(workspace: Workspace, text: str) -> str:
    """A model preset's key as is; a folder must be inside the workspace; anything else is a hub id (cached
    only: the run says so if it is not)."""
    from swiftk.kernel import starter

    text = text.strip()
    if text in starter.MODELS:
        return text
    if text.startswith("package:"):  # an installed package's folder; a sub path could lead anywhere
        if not PACKAGE.match(text):
            raise PathRefused(f"model {text!r}: give package:NAME (an installed package), without a path")
        return text
    if text.startswith((".", "/", "~")) or (workspace.root / text).exists():
        return workspace.relative(workspace.inside(text, "model folder"))
    return text


def default_metric(metrics: list[str]) -> str | None:
    evals = [m for m in metrics if m.startswith("eval_") and m != "eval_loss"]
    return evals[0] if evals else ("lr" if "lr" in metrics else (metrics[0] if metrics else None))


def compare_choice(views: Views, names: list[str] | None,
                   metric: str | None) -> tuple[list[RunView], list[str], str | None]:
    """The chosen runs' views, every metric any of them has, and the one to draw: the one asked for if any of
    them has it, else loss."""
    chosen = [views.get(name) for name in names or []]
    metrics = list(dict.fromkeys(m for v in chosen for m in v.metric_names()))
    return chosen, metrics, metric if metric in metrics else ("loss" if "loss" in metrics else default_metric(metrics))


def compare_table(views: list[RunView]) -> tuple[Any, str]:
    """The runs' eval reports side by side (rows: tasks), and a note naming runs without one."""
    import pandas as pd

    from swiftk.kernel.evals.report import compare

    reports = [(v.name, v.eval_report()) for v in views]
    present = [(label, report) for label, report in reports if report is not None]
    missing = [label for label, report in reports if report is None]
    note = f"no eval results in: {', '.join(missing)}" if missing else ""
    if not present:
        return None, note or "no eval results"
    head, rows = compare(present).cells_text()
    return pd.DataFrame(rows, columns=head), note + ("\n\nΔ against the first; * where the difference is "
                                                      "significant (~95 %)" if len(present) > 1 else "")


def finished(workspace: Workspace) -> list[str]:
    """The runs one can chat with: those with a final/ model."""
    return [p.name for p in workspace.run_dirs() if (p / "final").is_dir()]


def text_of(content: Any) -> str:
    """A Chatbot message's text (Gradio may hand back a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def problem(exc: BaseException) -> str:
    return "❌ " + str(exc).replace("\n", "  \n")


# ------------------------------------------------------------------------------------------------------- serving

def http_app(page: Any, token: str | None, hosts: list[str] | None = None) -> Any:
    """The FastAPI app serving ``page``. With a ``token`` every request must carry it; with ``hosts`` (a loopback
    bind) a request must name one of them in its Host header (another site's page cannot reach this one through
    DNS rebinding). Uploads are refused whatever the request carries: the page has no file input, and an uploaded
    file is a path the page never asked for."""
    import gradio as gr
    from fastapi import FastAPI, Request
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.responses import PlainTextResponse, RedirectResponse, Response

    from swiftk.kernel.serving import bearer

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if request.url.path.rstrip("/").endswith(UPLOADS):
            return PlainTextResponse("swiftk web takes no uploads\n", status_code=403)
        if token is None:
            return await call_next(request)
        given = request.query_params.get("token")
        candidate = given or request.cookies.get(TOKEN_COOKIE) or bearer(request)
        if not candidate or not secrets.compare_digest(candidate.encode(), token.encode()):
            return PlainTextResponse("swiftk web: this page needs its access token. Open the address `swiftk web` "
                                     "printed (it ends in ?token=...), or send 'Authorization: Bearer TOKEN'.\n",
                                     status_code=401)
        if given is not None and request.method == "GET":  # once: the token moves from the address to a cookie
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            response: Response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
        else:
            response = await call_next(request)
        if given is not None:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    if hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # system fonts: nothing to download offline
    return gr.mount_gradio_app(app, page, path="", footer_links=[], ssr_mode=False, theme=theme)
