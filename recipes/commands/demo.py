"""`vqdiff demo RUN`: a local web page (Gradio) to sample a run's generators and edit images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from recipes.checks import check_device
from recipes.console import console, edge, fail, out

DEMO_EXTRA = 'pip install -e ".[demo]"'


def demo(
    run: Annotated[Path, typer.Argument(help="A run folder, e.g. runs/quickstart.")],
    port: Annotated[int, typer.Option("--port", help="The port to serve on.")] = 7860,
    host: Annotated[
        str, typer.Option("--host", help="The address to bind; 0.0.0.0 shows the page to the network.")
    ] = "127.0.0.1",
    device: Annotated[
        Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1 ... [default: cpu]")
    ] = None,
) -> None:
    """Serve a web page to sample RUN's generators (the diffusion step by step) and to inpaint or
    outpaint an image. Needs the demo extra: pip install -e ".[demo]"."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio's import: no calls home
    try:
        # imported here only to name the missing extra in one line; the page is built in recipes.demo_app
        import gradio  # noqa: F401
    except ImportError:
        fail(f"the demo needs gradio, which is not installed: {DEMO_EXTRA}")
    with edge():
        # lazy on purpose: recipes.demo_app imports gradio (an optional extra, slow to import), so the
        # other commands and `vqdiff --help` neither need it nor wait for it
        from recipes.demo_app import build_demo

        page = build_demo(run, check_device(device) or "cpu")
        try:
            page.queue().launch(
                server_name=host, server_port=port, share=False, inbrowser=False, quiet=True, ssr_mode=False,
                prevent_thread_lock=True,
            )  # fmt: skip
        except OSError as e:  # the port taken, an address not of this machine
            fail(f"cannot serve on {host}:{port}: {e}")
        out.print(f"vqdiff demo of {run} on http://{host}:{port} (Ctrl-C to stop)", soft_wrap=True)
        if host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"note: --host {host} serves the page to other machines")
        page.block_thread()  # until Ctrl-C, which closes the server
