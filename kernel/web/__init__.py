"""``swiftk web``: launch, watch and compare runs, and chat with a checkpoint, in a browser.

- ``workspace``: the folders the page may touch (path fields are resolved and confined there) and the runs in them.
- ``runs``: one run as the page shows it, read from its typed events (``contracts.events.Tail``) and eval report.
- ``launcher``: the runs this server started, as ``swiftk run`` subprocesses it can stop.
- ``chat``: a checkpoint loaded behind its Generator, answering one streamed turn at a time.
- ``app``: the Gradio page, and the HTTP app that serves it behind the access token.

Nothing here executes code a form sends: a config is data, validated exactly as ``swiftk run`` validates it, and
plugins come only from the paths a config names.
"""
