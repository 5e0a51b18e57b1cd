"""Pretrained weights by name, served from a local HTTP server on the loopback address: torchvision-style
files checked by the hash in their names, hub files by the SHA-256 the server states, a cache that
serves the second call without a network, offline mode, and one clear error (URL and cache path) when
there is no network or the file is corrupt."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import cnnkit
from cnnkit.hub import TIMM_TAGS, Pretrained, find_pretrained, list_pretrained, register_pretrained


class _Server:
    """Files under ``root`` on 127.0.0.1; ``headers`` per path (e.g. X-Linked-Etag); ``hits`` counts GETs."""

    def __init__(self, root: Path) -> None:
        self.root, self.headers, self.hits = root, {}, 0
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

            def end_headers(self) -> None:
                for key, value in server.headers.get(self.path, {}).items():
                    self.send_header(key, value)
                super().end_headers()

            def do_GET(self) -> None:
                server.hits += 1
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CNNKIT_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    (tmp_path / "www").mkdir()
    running = _Server(tmp_path / "www")
    yield running
    running.stop()


def _torchvision_style(server: _Server, tag: str) -> tuple[Pretrained, dict[str, torch.Tensor]]:
    """torchvision's resnet18 (random) saved as torchvision names its files: ``name-<sha256[:8]>.pth``."""
    state = torchvision.models.resnet18(weights=None).state_dict()
    tmp = server.root / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    tmp.rename(server.root / f"resnet18-{digest}.pth")
    entry = Pretrained(tag, "resnet18", f"{server.url}/resnet18-{digest}.pth", digest, "mirror")
    return register_pretrained(entry), state


def test_a_tag_downloads_once_and_loads(server: _Server) -> None:
    entry, state = _torchvision_style(server, "resnet18.test_in1k")
    built = cnnkit.create_model("resnet18.test_in1k")  # a tag names its model; weights only when asked
    assert built.cnnkit_config["name"] == "resnet18" and server.hits == 0
    model = cnnkit.create_model("resnet18.test_in1k", pretrained=True, num_classes=10)
    assert torch.equal(model.state_dict()["stem.conv.conv.weight"], state["conv1.weight"])
    assert model.pretrained_cfg["tag"] == "resnet18.test_in1k" and entry.cache_path.is_file()
    assert server.hits == 1
    server.stop()  # the second time comes from the cache, without a network
    again = cnnkit.create_model("resnet18", pretrained="resnet18.test_in1k")
    assert torch.equal(again.state_dict()["stem.conv.conv.weight"], state["conv1.weight"])


def test_a_corrupt_download_is_refused_and_not_kept(server: _Server) -> None:
    entry, _ = _torchvision_style(server, "resnet18.bad_in1k")
    file = server.root / Path(entry.url).name
    file.write_bytes(file.read_bytes()[:-10] + b"0123456789")  # same size, other bytes
    with pytest.raises(cnnkit.CnnkitError, match="corrupt"):
        cnnkit.create_model("resnet18.bad_in1k", pretrained=True)
    assert not entry.cache_path.exists() and not list(entry.cache_path.parent.glob("*"))


def test_offline_and_no_network_say_where_to_put_the_file(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry, _ = _torchvision_style(server, "resnet18.away_in1k")
    monkeypatch.setenv("CNNKIT_OFFLINE", "1")
    with pytest.raises(cnnkit.CnnkitError, match="offline") as offline:
        cnnkit.create_model("resnet18.away_in1k", pretrained=True)
    assert entry.url in str(offline.value) and str(entry.cache_path) in str(offline.value)
    monkeypatch.delenv("CNNKIT_OFFLINE")
    server.stop()
    with pytest.raises(cnnkit.CnnkitError, match="could not download") as no_network:
        cnnkit.create_model("resnet18.away_in1k", pretrained=True)
    assert entry.url in str(no_network.value) and str(entry.cache_path) in str(no_network.value)


def test_hub_weights_are_checked_against_the_stated_sha256(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """timm's file layout on the hub (``timm/TAG/resolve/main/model.safetensors``, sorted timm names,
    the SHA-256 in ``X-Linked-Etag``): loaded in timm's registration order and equal to timm's model."""
    import timm

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    reference = timm.create_model("mobilenetv3_small_100").eval()
    folder = server.root / "timm" / "mobilenetv3_small_100.lamb_in1k" / "resolve" / "main"
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()}, str(folder / "model.safetensors")
    )
    path = "/timm/mobilenetv3_small_100.lamb_in1k/resolve/main/model.safetensors"
    server.headers[path] = {"X-Linked-Etag": '"' + "0" * 64 + '"'}
    with pytest.raises(cnnkit.CnnkitError, match="corrupt"):
        cnnkit.create_model("mobilenetv3_small_100.lamb_in1k", pretrained=True)
    server.headers[path] = {
        "X-Linked-Etag": f'"{hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()}"'
    }
    model = cnnkit.create_model("mobilenetv3_small_100.lamb_in1k", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)


def test_the_known_tags() -> None:
    """torchvision's tags come from torchvision's own registry (the same URLs); resnet50's default is its
    current recipe; every timm tag names a cnnkit model."""
    from torchvision.models import get_model_weights

    assert {"resnet50.tv_in1k", "resnet50.tv2_in1k", "resnet50.a1_in1k"} <= set(list_pretrained("resnet50*"))
    assert find_pretrained("resnet50").url == get_model_weights("resnet50").DEFAULT.url
    assert find_pretrained("googlenet").args == {"transform_input": True}
    assert set(TIMM_TAGS.values()) <= set(cnnkit.list_models())
    with pytest.raises(cnnkit.CnnkitError, match=r"known for resnet50: resnet50\.a1_in1k"):
        find_pretrained("resnet50.nope")
