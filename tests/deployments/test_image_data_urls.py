"""Image data: URLs as a browser reads them (WHATWG's forgiving-base64 decode): base64 wrapped in lines (what
the `base64` command writes), without its `=` padding, or under an upper-case scheme. Each was a 400 ('not
valid base64', or for DATA: 'is not fetched by this server; send a data: URI'), reproduced on a live app;
an empty one was told it was not base64."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from deployments.errors import InvalidRequestError
from deployments.limits import RequestLimits
from deployments.media import decode_image, load_image


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (41, 30), (200, 10, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("url", [
    "data:image/png;base64," + base64.encodebytes(png()).decode(),  # 76-column lines, as `base64` writes
    "data:image/png;base64," + base64.b64encode(png()).decode().rstrip("="),
    "data:image/png;base64, " + base64.b64encode(png()).decode() + "\r\n",
    "DATA:image/png;BASE64," + base64.b64encode(png()).decode(),
])
def test_a_data_url_a_browser_shows_is_the_image(url):
    assert base64.b64encode(png()).decode().endswith("="), "the sample needs padding to test its absence"
    data = load_image(url, RequestLimits(), [], "messages.0.content.1.image_url")
    assert data == png() and decode_image(data).size == (41, 30)


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png;base64,", "holds no data"),
    ("data:image/png;base64, \n", "holds no data"),
    ("data:image/png;base64,iVBO*w0K", "not valid base64"),
    ("data:image/png;base64," + base64.urlsafe_b64encode(b"\xfb\xff" * 30).decode(), "not valid base64"),
    ("data:image/png;base64,A", "not valid base64"),
    ("data:image/png,rawbytes", "must be base64"),
])
def test_a_data_url_that_is_not_base64_image_data_is_a_400_saying_why(url, words):
    with pytest.raises(InvalidRequestError, match=words) as info:
        load_image(url, RequestLimits(), [], "messages.0.content.1.image_url")
    assert info.value.param == "messages.0.content.1.image_url"
