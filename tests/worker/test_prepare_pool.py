"""Media is fetched and decoded off the claim thread: a slow URL never holds up another deployment's jobs."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.conftest import Fleet
from tests.oracle import assert_same, local_pipeline
from tests.tasks.media_server import media_settings
from tests.worker.test_media import PNG

STALL_S = 4.0


class _SlowImages(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        time.sleep(STALL_S)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)


def test_a_slow_media_url_does_not_stall_claiming_for_other_deployments(fleet: Fleet, model_dir, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowImages)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    text_model = str(model_dir("text-classification"))
    config = fleet.config([{"name": "pp-img", "task": "image-classification", "model": str(model_dir("image-classification"))},
                           {"name": "pp-tc", "task": "text-classification", "model": text_model}],
                          media=media_settings(tmp_path))
    worker = fleet.worker(config, deployments=["pp-img", "pp-tc"])
    try:
        with fleet.client() as client:
            images = [client.submit(deployment="pp-img", inputs=f"http://127.0.0.1:{server.server_address[1]}/{i}.png")
                      for i in range(6)]
            time.sleep(0.5)  # the image jobs are claimed and fetching
            text = "claimed while images download"
            output = client.submit(deployment="pp-tc", inputs=text).result(timeout=30)
            images_done_at_text = sum(job.status().state.value == "SUCCESS" for job in images)
            for job in images:
                job.result(timeout=60)
    finally:
        server.shutdown()
    assert_same(output, local_pipeline("text-classification", text_model)(text))
    assert images_done_at_text == 0, "the text job waited for the image downloads"
    assert "Traceback" not in worker.log()
