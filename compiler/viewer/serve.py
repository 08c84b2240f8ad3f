"""``fssc view PROG``: serve the IR dump viewer on 127.0.0.1.

The page (``prog/ir/index.html``) is self-contained; the server only hands
out the files of ``prog/ir/`` (the page, ``timings.js`` and the per-pass
text dumps) to the local machine, and stops on Ctrl-C.
"""

from __future__ import annotations

import functools
import http.server
import os
import signal
import threading
import webbrowser
from collections.abc import Callable

from fssc.errors import FsscError


def viewer_dir(prog: str) -> str:
    """The folder holding index.html: PROG/ir, PROG itself, or the folder of a given index.html."""
    if os.path.isfile(prog):
        if os.path.basename(prog) != "index.html":
            raise FsscError(f"{prog}: not a viewer page (expected prog/ or prog/ir/index.html)")
        return os.path.dirname(os.path.abspath(prog))
    for d in (os.path.join(prog, "ir"), prog):
        if os.path.isfile(os.path.join(d, "index.html")):
            return os.path.abspath(d)
    raise FsscError(
        f"{prog}: no IR viewer here (compile with --dump-ir: it writes {os.path.join(prog, 'ir', 'index.html')})"
    )


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - quiet: the terminal shows the URL only
        pass

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")  # a recompile shows at the next reload
        super().end_headers()


def make_server(prog: str, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    root = viewer_dir(prog)
    handler = functools.partial(_Handler, directory=root)
    try:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise FsscError(
            f"--port {port}: cannot listen on 127.0.0.1:{port} ({e.strerror}); --port 0 picks a free port"
        ) from e
    httpd.daemon_threads = True
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/index.html"


def serve_viewer(prog: str, port: int = 0, open_browser: bool = False, echo: Callable[[str], None] = print) -> None:
    # Ctrl-C stops the server even when fssc was started where SIGINT is ignored (a shell's background job)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    httpd, url = make_server(prog, port)
    echo(f"serving {viewer_dir(prog)} at {url}  (Ctrl-C to stop)")
    if open_browser:

        def open_page() -> None:
            if not webbrowser.open(url):
                echo("no browser found: open the URL yourself")

        threading.Thread(target=open_page, daemon=True).start()
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        echo("stopped")
    finally:
        httpd.server_close()
