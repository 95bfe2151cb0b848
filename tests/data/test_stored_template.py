"""An adapter folder's chat_template.jinja comes from whoever made the adapter (a download):
one that is not UTF-8, huge or not Jinja is refused naming the file, before any prompt is built
(serve reads it at each request: a 400 naming it, not a 500 or gigabytes read per request)."""

import pytest

from loratune.data import DataError
from loratune.data.templates import MAX_TEMPLATE_BYTES, TEMPLATE_FILE, TEMPLATES, adapters_template


def _adapter(tmp_path, content: bytes):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / TEMPLATE_FILE).write_bytes(content)
    return folder


def test_a_template_that_is_not_utf8_is_named(tmp_path):
    folder = _adapter(tmp_path, b"{{ messages }}\xff\xfe")
    with pytest.raises(DataError, match=rf"{folder / TEMPLATE_FILE}: not UTF-8 text \(byte 14\)"):
        adapters_template([folder])


def test_a_huge_template_is_refused_reading_no_further(tmp_path):
    folder = _adapter(tmp_path, b"x" * (MAX_TEMPLATE_BYTES + 1))
    with pytest.raises(DataError, match=rf"{TEMPLATE_FILE}: more than the {MAX_TEMPLATE_BYTES} "
                                        "bytes a chat template may have"):
        adapters_template([folder])


def test_a_template_with_a_jinja_syntax_error_names_its_line(tmp_path):
    folder = _adapter(tmp_path, b"{% for m in messages %}\n{{ m.content \n")
    with pytest.raises(DataError, match=rf"{TEMPLATE_FILE}: line 2: not a Jinja template"):
        adapters_template([folder])


def test_a_stored_bundled_template_still_reads(tmp_path):
    folder = _adapter(tmp_path, TEMPLATES["chatml_tools"].encode())
    assert adapters_template([folder])[0] == TEMPLATES["chatml_tools"]


def test_transformers_tags_are_jinja_here_too(tmp_path):
    """{% generation %} and {% break %} are transformers' extensions: a template using them is
    one (a plain jinja2 parse would refuse it)."""
    text = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
            "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% break %}{% endif %}"
            "{% endfor %}")
    assert adapters_template([_adapter(tmp_path, text.encode())])[0] == text


@pytest.mark.parametrize("target", ["/proc/self/environ", "outside"])
def test_a_link_out_of_the_adapter_folder_is_not_followed(tmp_path, target):
    """Else the server's environment (API keys) or any file it can read would lead every
    prompt of that adapter."""
    if target == "outside":
        target = tmp_path / "secret.txt"
        target.write_text("HF_TOKEN=hf_secret")
    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / TEMPLATE_FILE).symlink_to(target)
    with pytest.raises(DataError, match=rf"{TEMPLATE_FILE}: a link out of the adapter folder"):
        adapters_template([folder])


def test_a_hugging_face_snapshot_links_into_its_blobs(tmp_path):
    """The hub cache keeps files in blobs/ and links snapshots/REV/NAME to them: still read."""
    repo = tmp_path / "models--someone--adapter"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "1234abcd").write_text(TEMPLATES["chatml"])
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / TEMPLATE_FILE).symlink_to("../../blobs/1234abcd")
    assert adapters_template([snapshot])[0] == TEMPLATES["chatml"]
