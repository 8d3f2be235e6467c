"""model=hub in mode=plan: config.json and the safetensors headers through huggingface_hub's metadata API, never a
weight byte. A loopback HTTP server in this test plays the hub: its headers describe a 70B model (131 GiB of
tensors) that it does not have, and it counts every byte it serves."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import read_manifest, run_cli_in_process
from families import shape_only_shards

CONFIG = Path(__file__).parent / "data" / "configs" / "Llama-3.1-70B" / "config.json"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "fake-org/giant-70b"
SHARDS = 30


def llama_70b_tensors() -> dict[str, list[int]]:
    """The checkpoint's tensor names and shapes, from the model transformers builds for the config (meta device)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CONFIG.parent), dtype=torch.bfloat16)
    return {name: list(t.shape) for name, t in model.state_dict().items()}


class FakeHub:
    """Files of one repo at one commit: small ones whole, shards as a header and a virtual body of zeros."""

    def __init__(self, tensors: dict[str, list[int]]) -> None:
        self.files: dict[str, bytes] = {"config.json": CONFIG.read_bytes()}
        self.sizes: dict[str, int] = {}
        self.served = 0
        shards, index = shape_only_shards(tensors, SHARDS)
        for file, (header, size) in shards.items():
            self.files[file], self.sizes[file] = header, size
        self.files["model.safetensors.index.json"] = json.dumps(index).encode()
        self.total = index["metadata"]["total_size"]

    def size(self, name: str) -> int:
        return self.sizes.get(name, len(self.files[name]))

    def read(self, name: str, start: int, end: int) -> bytes:
        known = self.files[name][start : end + 1]
        return known + b"\0" * (end + 1 - start - len(known))  # past the header: the weights it does not have


def handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _file(self) -> str | None:
            prefix = f"/{REPO}/resolve/"
            if not self.path.startswith(prefix):
                return None
            revision, _, name = self.path[len(prefix) :].partition("/")
            return name if revision in ("main", COMMIT) and name in hub.files else None

        def _head(self, name: str | None, length: int, status: int = 200) -> None:
            if name is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(status)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{name}-etag"')
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")

        def do_HEAD(self) -> None:
            name = self._file()
            self._head(name, hub.size(name) if name else 0)
            if name:
                self.end_headers()

        def do_GET(self) -> None:
            name = self._file()
            if name is None:
                return self._head(None, 0)
            wanted = self.headers.get("Range") or self.headers.get("range")
            start, end = 0, hub.size(name) - 1
            if wanted:
                first, _, last = wanted.removeprefix("bytes=").partition("-")
                start, end = int(first), min(int(last) if last else end, end)
            body = hub.read(name, start, end)
            self._head(name, len(body), 206 if wanted else 200)
            if wanted:
                self.send_header("Content-Range", f"bytes {start}-{end}/{hub.size(name)}")
            self.end_headers()
            self.wfile.write(body)
            hub.served += len(body)

    return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    hub = FakeHub(llama_70b_tensors())
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield hub
    server.shutdown()


def test_hub_plan_reads_config_and_headers_only(fake_hub, tmp_path) -> None:
    assert fake_hub.total > 100 * 2**30  # the repo describes 131 GiB of weights
    overrides = ["mode=plan", "model=hub", f"model.repo_id={REPO}", "quant=bnb-nf4", "device_map.max_memory.0=80GiB"]
    result = run_cli_in_process(*overrides, run_dir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert fake_hub.served < 2**20, fake_hub.served  # config.json, the index, 30 headers: about 0.2 MiB
    manifest = read_manifest(tmp_path)
    plan = manifest["plan"]
    assert plan["computed_from"] == "headers" and plan["parameters"] == 70_553_706_496 and plan["fits"] is True
    assert manifest["checkpoint"]["hub"]["commit"] == COMMIT
    assert plan["peak_load_bytes"] == plan["footprint_bytes"] + max(fake_hub.sizes.values())
    assert "computed from             config.json and the headers of the shards here" in result.stdout


def test_a_hub_repo_without_config_json_is_one_line_and_a_failed_manifest(fake_hub, tmp_path) -> None:
    overrides = ["mode=plan", "model=hub", "model.repo_id=fake-org/no-such-repo", "quant=none"]
    result = run_cli_in_process(*overrides, run_dir=tmp_path)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-2]
    assert line.startswith("qloader: error: CheckpointError: model.repo_id 'fake-org/no-such-repo': its config.json")
    assert "check the name and model.revision" in line and fake_hub.served == 0
    assert read_manifest(tmp_path)["error"]["type"] == "CheckpointError"
