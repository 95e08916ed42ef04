"""A fake Google Cloud Storage bucket for tests: gcp-storage-emulator's server on 127.0.0.1 (in a
process of its own), with
gcsfs (through etils.epath) and tensorstore (through Orbax) pointed at it by their own variables.
Subprocesses inherit the variables and reach the same server."""
import contextlib
import logging
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]

BUCKET = "derta-test"
_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def _with_generation(download):
    """The emulator's download handler, also sending the object's generation as GCS does
    (`x-goog-generation`): tensorstore reads it to know which version it read (OCDBT manifests)."""
    def handler(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # a missing object: the handler answered 404
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
    return handler


def _patch_emulator() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    objects.download = _with_generation(objects.download)  # what objects.get(alt=media) calls
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if getattr(handler, "__name__", "") == "download":
                handlers[method] = objects.download


def serve(port: int) -> None:
    """The server, in a process of its own (so that it does not share the tests' interpreter)."""
    from gcp_storage_emulator.server import create_server
    _patch_emulator()
    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET).start()
    threading.Event().wait()  # until terminated


@contextlib.contextmanager
def fake_bucket() -> Iterator[str]:
    """Serve an empty in-memory bucket; yields its URL, `gs://derta-test`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", f"from tests.fake_bucket import serve; serve({port})"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            break
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"the fake GCS server did not start (exit code {server.poll()})")
        time.sleep(0.1)
    before = {k: os.environ.get(k) for k in _VARIABLES}
    url = f"http://127.0.0.1:{port}"
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                      GOOGLE_AUTH_TOKEN_FOR_TESTING="fake")  # tensorstore's test-only token
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.terminate()
        server.wait(30)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
