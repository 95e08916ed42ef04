"""A fake Google Cloud Storage bucket for tests: gcp-storage-emulator's server on 127.0.0.1, with
gcsfs (through etils.epath) and tensorstore (through Orbax) pointed at it by their own variables.
Subprocesses inherit the variables and reach the same server."""
import contextlib
import logging
import os
import socket
from typing import Iterator

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
    handler.patched = True
    return handler


def _patch_emulator() -> None:
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects
    if getattr(objects.download, "patched", False):
        return
    objects.download = _with_generation(objects.download)  # what objects.get(alt=media) calls
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if getattr(handler, "__name__", "") == "download":
                handlers[method] = objects.download


@contextlib.contextmanager
def fake_bucket() -> Iterator[str]:
    """Serve an empty in-memory bucket; yields its URL, `gs://derta-test`."""
    from gcp_storage_emulator.server import create_server
    _patch_emulator()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    before = {k: os.environ.get(k) for k in _VARIABLES}
    url = f"http://127.0.0.1:{port}"
    os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                      GOOGLE_AUTH_TOKEN_FOR_TESTING="fake")  # tensorstore's test-only token
    for name, level in (("gcsfs", logging.ERROR), ("gcp_storage_emulator", logging.CRITICAL)):
        logging.getLogger(name).setLevel(level)
    try:
        yield f"gs://{BUCKET}"
    finally:
        server.stop()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
