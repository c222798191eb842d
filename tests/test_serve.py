"""`vismem serve` (issue 19): a real server process on loopback, driven by a real HTTP client.

One memory (the conftest's Fashion-MNIST 'train' set) is built by `vismem add` and served once
for the module; the tests upload real images, hostile ones too, and check the server goes on.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import requests
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vismem(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def server(fm_sets, tmp_path_factory):
    home = tmp_path_factory.mktemp("served") / "home"
    done = vismem(home, "add", str(fm_sets["train"]), "--name", "train")
    assert done.returncode == 0, done.stderr
    yield from serving(home)


def serving(home: Path, env: dict | None = None):
    """`vismem serve` on a memory home, in its own process, until the generator is closed."""
    port = free_port()
    log = open(home.parent / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), "serve", "--port",
                             str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            pytest.fail(f"vismem serve did not come up: {log.read()[-3000:]}")
        time.sleep(0.3)
    try:
        yield url, home
    finally:
        proc.terminate()
        proc.wait(30)
        log.seek(0)
        logged = log.read()
    assert "Traceback" not in logged, "the server logged a traceback"   # every refusal was a 4xx


def uploads(paths: list[Path]) -> list[tuple]:
    return [("files", (p.name, p.read_bytes(), "image/png")) for p in paths]


def test_classify_answers_as_the_command_line_does(server, fm_sets):
    url, home = server
    queries = sorted(fm_sets["test"].rglob("*.png"))[:6]
    answer = requests.post(f"{url}/classify", files=uploads(queries), params={"k": 7}, timeout=120)
    assert answer.status_code == 200, answer.text
    cli = vismem(home, "classify", *map(str, queries), "--k", "7", "--json")
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    got = answer.json()
    assert [p["path"] for p in got] == [q.name for q in queries]
    assert [p["label"] for p in got] == [p["label"] for p in expected]
    assert [round(p["confidence"], 6) for p in got] == [round(p["confidence"], 6) for p in expected]
    assert [[n["sample_id"] for n in p["neighbors"]] for p in got] == \
        [[n["sample_id"] for n in p["neighbors"]] for p in expected]


def test_a_stored_image_is_its_own_nearest_neighbour(server, fm_sets):
    url, _ = server
    stored = sorted((fm_sets["train"] / "Sneaker").glob("*.png"))[0]
    (p,) = requests.post(f"{url}/classify", files=uploads([stored]), timeout=60).json()
    assert p["label"] == "Sneaker" and p["neighbors"][0]["similarity"] > 0.999


def png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "not an image": (b"%PDF-1.4 not an image at all", 400, "not a readable image: not an image"),
    "a decompression bomb": (png((20_000, 20_000)), 400, "not a readable image"),
    "truncated": (png((64, 64))[:60], 400, "not a readable image"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_a_bad_upload_is_a_4xx_that_says_why_and_the_server_goes_on(server, what):
    url, _ = server
    data, status, says = BAD[what]
    answer = requests.post(f"{url}/classify", files=[("files", ("bad.png", data, "image/png"))], timeout=60)
    assert answer.status_code == status and says in answer.json()["detail"], answer.text
    assert requests.get(f"{url}/healthz", timeout=10).ok


def test_one_bad_file_among_good_ones_gets_an_error_object(server, fm_sets):
    url, _ = server
    good = sorted((fm_sets["test"] / "Bag").glob("*.png"))[:1]
    files = uploads(good) + [("files", ("broken.png", b"\x89PNG\r\n\x1a\n broken", "image/png"))]
    answer = requests.post(f"{url}/classify", files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    first, second = answer.json()
    assert first["label"] and second["path"] == "broken.png" and "not a readable image" in second["error"]


def test_a_huge_body_is_refused_before_it_is_read(server):
    url, _ = server
    body = b"0" * (64 * 2**20 + 1)
    answer = requests.post(f"{url}/classify", data=body, headers={"Content-Type": "multipart/form-data; boundary=x"},
                           timeout=120)
    assert answer.status_code == 413 and "at most" in answer.json()["detail"]
    chunked = requests.post(f"{url}/classify", data=iter([b"x" * 1024]), timeout=60)   # no length given
    assert chunked.status_code == 411
    assert requests.get(f"{url}/healthz", timeout=10).ok


def test_a_wrong_field_or_parameter_is_a_422_naming_it(server, fm_sets):
    url, _ = server
    image = sorted((fm_sets["test"] / "Bag").glob("*.png"))[0]
    wrong_field = requests.post(f"{url}/classify", files=[("file", (image.name, image.read_bytes()))], timeout=60)
    assert wrong_field.status_code == 422 and "parts named 'files'" in wrong_field.json()["detail"]
    wrong_k = requests.post(f"{url}/classify", files=uploads([image]), params={"k": 0}, timeout=60)
    assert wrong_k.status_code == 422 and wrong_k.json()["detail"].startswith("k:")
    wrong_strategy = requests.post(f"{url}/classify", files=uploads([image]), params={"strategy": "vibes"}, timeout=60)
    assert wrong_strategy.status_code == 422 and "strategy" in wrong_strategy.json()["detail"]


def test_explain_returns_a_picture_or_a_page(server, fm_sets):
    url, _ = server
    image = sorted((fm_sets["test"] / "Bag").glob("*.png"))[0]
    picture = requests.post(f"{url}/explain", files={"file": (image.name, image.read_bytes())}, timeout=60)
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(picture.content)).size[0] > 100
    page = requests.post(f"{url}/explain", files={"file": (image.name, image.read_bytes())},
                         params={"format": "html"}, timeout=60)
    assert page.status_code == 200 and "<img" in page.text and image.name in page.text


def test_status_and_the_openapi_description(server):
    url, home = server
    status = requests.get(f"{url}/status", timeout=30).json()
    assert status["home"] == str(home) and status["samples"]["active"] >= 100
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    assert {"/classify", "/explain", "/status", "/healthz"} <= set(spec["paths"])
    assert "files" in json.dumps(spec["components"])
    assert requests.get(f"{url}/docs", timeout=30).status_code == 200


def test_a_new_index_version_is_served_without_a_restart(server, fm_sets, tmp_path):
    url, home = server
    before = requests.get(f"{url}/status", timeout=30).json()["live_indexes"][0]["version"]
    more = tmp_path / "more"
    shutil.copytree(fm_sets["more"], more)
    done = vismem(home, "add", str(more), "--name", "more")     # another process, while the server runs
    assert done.returncode == 0, done.stderr
    after = requests.get(f"{url}/status", timeout=30).json()
    assert after["live_indexes"][0]["version"] > before and after["samples"]["active"] == 150
    stored = sorted((more / "Bag").glob("*.png"))[0]
    (p,) = requests.post(f"{url}/classify", files=uploads([stored]), timeout=60).json()
    assert p["neighbors"][0]["similarity"] > 0.999 and p["label"] == "Bag"   # found only in the new version


def test_the_openapi_page_classifies_an_upload_in_chromium(server, fm_sets, browser):
    """The /docs page (Swagger UI from files in a package: no internet here) loads in headless
    Chromium, and a classify call made from it answers the stored image's label."""
    url, _ = server
    stored = sorted((fm_sets["train"] / "Trouser").glob("*.png"))[0]
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    page.set_default_timeout(60_000)
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(f"{url}/docs")
    op = page.locator("#operations-default-classify_classify_post")
    op.locator(".opblock-summary").first.click()
    op.locator("button.try-out__btn").click()
    op.locator("input[placeholder='k']").fill("1")          # the nearest neighbour alone: itself
    op.locator("input[type=file]").first.set_input_files(str(stored))
    op.locator("button.execute").click()
    body = op.locator(".live-responses-table .response-col_description pre").first
    body.wait_for()
    (answer,) = json.loads(body.inner_text())
    (REPO / "test-artifacts").mkdir(exist_ok=True)
    page.screenshot(path=str(REPO / "test-artifacts" / "serve-docs.png"), full_page=True)   # for people to look at
    page.close()
    assert answer["path"] == stored.name and answer["label"] == "Trouser", answer
    assert not failed, f"the page asked for what it could not load: {failed}"


def test_a_sharded_memory_is_served_and_a_forget_elsewhere_is_picked_up(fm_sets, tmp_path):
    """A memory of 3 shards (VISMEM_SHARDS when it was created): the server searches every shard
    and answers as the command line does; a forget by another process erases in some shards and
    the server's next answer never names the forgotten samples, without a restart."""
    home = tmp_path / "home"
    env = {**os.environ, "VISMEM_SHARDS": "3"}
    done = subprocess.run([sys.executable, "-m", "vismem_assets.cli", "--home", str(home), "add",
                           str(fm_sets["train"])], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    served = serving(home, env)
    url, _ = next(served)
    try:
        assert requests.get(f"{url}/status", timeout=30).json()["shards"] == 3
        queries = sorted(fm_sets["test"].rglob("*.png"))[:5]
        got = requests.post(f"{url}/classify", files=uploads(queries), params={"k": 9}, timeout=120).json()
        cli = [json.loads(line) for line in vismem(home, "classify", *map(str, queries), "--k", "9", "--json")
               .stdout.splitlines()]
        assert [[n["sample_id"] for n in p["neighbors"]] for p in got] == \
            [[n["sample_id"] for n in p["neighbors"]] for p in cli]
        victims = sorted({n["sample_id"] for p in got for n in p["neighbors"][:2]})
        forget = vismem(home, "forget", "--sample", *victims, "--requested-by", "alice",
                        "--reason", "asked to be removed")
        assert forget.returncode == 0, forget.stderr
        again = requests.post(f"{url}/classify", files=uploads(queries), params={"k": 9}, timeout=120).json()
        assert not {n["sample_id"] for p in again for n in p["neighbors"]} & set(victims)
    finally:
        served.close()
