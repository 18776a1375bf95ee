"""`file://` image URLs are read only under `allowed_media_dirs`, whatever the URL does to get out.

A real app (the tiny LLaVA alone) with allowed_media_dirs set to a temporary directory. The
files outside it are valid PNGs: were one read, the request would succeed and the test fail.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

import openai
import pytest
from PIL import Image

from serve_testutil import run_app

PARAM = "messages.0.content.0.image_url"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    allowed, outside, sibling = root / "allowed", root / "outside", root / "allowed-evil"
    for directory in (allowed, allowed / "sub", outside, sibling):
        directory.mkdir()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(allowed / "red.png")
    Image.new("RGB", (48, 40), (30, 200, 30)).save(allowed / "sub" / "green image.png")
    Image.new("RGB", (48, 40), (30, 30, 200)).save(outside / "secret.png")
    Image.new("RGB", (48, 40), (30, 30, 200)).save(sibling / "secret.png")
    os.symlink(outside / "secret.png", allowed / "link-out.png")  # a file link pointing outside
    os.symlink(outside, allowed / "dir-out")  # a directory link pointing outside
    os.symlink(allowed / "red.png", allowed / "link-in.png")  # a link that stays inside
    return {"root": root, "allowed": allowed, "outside": outside, "sibling": sibling}


@pytest.fixture(scope="module")
def media_app(serve_url, models_dir, media):
    from ray import serve

    args = {
        "device": "cpu",
        "request_timeout_s": 60,
        "local_models_dir": str(models_dir),
        "allowed_media_dirs": [str(media["allowed"])],
        "models": [{"name": "tiny-llava", "source": "tiny-llava", "build_tiny": "vlm", "max_new_tokens": 8}],
        "families": {"vlm": {"autoscaling": None, "num_cpus": 0.25}},
    }
    app = run_app(serve_url, "media", args)
    app.wait_for(lambda h: h["status"] == "ok", timeout=120)
    yield app
    serve.delete("media")


def ask(app, url: str):
    return app.openai().chat.completions.create(
        model="tiny-llava", max_tokens=4, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "What is this?"}]}])


def file_url(path: Path | str) -> str:
    return "file://" + quote(str(path))


@pytest.mark.parametrize("name", ["red.png", "sub/green image.png", "link-in.png"])
def test_a_file_inside_an_allowed_dir_is_read(media_app, media, name):
    reply = ask(media_app, file_url(media["allowed"] / name))
    assert reply.usage.prompt_tokens > 16  # the image's tokens plus the text
    assert reply.usage.completion_tokens >= 1


def test_files_inside_are_read_as_the_images_they_are(media_app, media):
    """The answer depends on the file named: the server read that file, not some default image."""
    red = ask(media_app, file_url(media["allowed"] / "red.png")).choices[0].message.content
    green = ask(media_app, file_url(media["allowed"] / "sub" / "green image.png")).choices[0].message.content
    assert red != green


ESCAPES = {
    "outside": lambda m: file_url(m["outside"] / "secret.png"),
    "plain-absolute-path": lambda m: str(m["outside"] / "secret.png"),
    "sibling-with-same-prefix": lambda m: file_url(m["sibling"] / "secret.png"),
    "symlink-to-a-file-outside": lambda m: file_url(m["allowed"] / "link-out.png"),
    "symlink-to-a-dir-outside": lambda m: file_url(m["allowed"] / "dir-out" / "secret.png"),
    "dot-dot": lambda m: f"file://{m['allowed']}/../outside/secret.png",
    "dot-dot-through-subdir": lambda m: f"file://{m['allowed']}/sub/../../outside/secret.png",
    "encoded-dot-dot": lambda m: f"file://{m['allowed']}/%2e%2e/outside/secret.png",
    "encoded-dot-dot-upper": lambda m: f"file://{m['allowed']}/%2E%2E/%2E%2E/{m['root'].name}/outside/secret.png",
    "encoded-separators": lambda m: f"file://{m['allowed']}%2F..%2Foutside%2Fsecret.png",
    "encoded-separators-and-dots": lambda m: f"file://{m['allowed']}%2f%2e%2e%2foutside%2fsecret.png",
    "encoded-separators-inside": lambda m: f"file://{m['allowed']}/sub%2F..%2F..%2Foutside%2Fsecret.png",
    "double-encoded": lambda m: f"file://{m['allowed']}/%252e%252e/outside/secret.png",
    "host-part": lambda m: f"file://localhost{m['outside']}/secret.png",
    "system-file": lambda m: "file:///etc/passwd",
}


@pytest.mark.parametrize("escape", list(ESCAPES))
def test_a_file_outside_the_allowed_dirs_is_refused(media_app, media, escape):
    url = ESCAPES[escape](media)
    with pytest.raises(openai.BadRequestError) as caught:
        ask(media_app, url)
    error = caught.value.body
    assert error["param"] == PARAM, error  # refused, whether as outside or as not there
    if escape == "outside":
        assert "allowed_media_dirs" in error["message"], error  # says which setting decides


def test_a_missing_file_inside_is_a_clear_400(media_app, media):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(media_app, file_url(media["allowed"] / "nope.png"))
    assert caught.value.body["param"] == PARAM and "does not exist" in caught.value.body["message"]


def test_a_refusal_leaves_the_server_healthy(media_app, media):
    with pytest.raises(openai.BadRequestError):
        ask(media_app, file_url(media["outside"] / "secret.png"))
    assert media_app.get("/health").json()["status"] == "ok"
    assert ask(media_app, file_url(media["allowed"] / "red.png")).usage.completion_tokens >= 1
